"""LUKS1 volumes, read-only, as QEMU's ``luks`` driver reads them.

Without a key the header is still read and checked, so ``info`` shows what qemu-img
shows (cipher, hash, key slots, payload offset); mapping or reading then fails as
qemu-img fails ("Parameter 'key-secret' is required for cipher").  With a key given the
qemu-img way (see :mod:`qcowlib.core.secrets`), a key slot is unlocked on open and the
payload is decrypted a run of sectors at a time (:mod:`.crypto`).  The guest disk is
everything after the payload offset; its extents are one data run with no host offset,
as qemu-img maps it (the bytes on disk are not the guest's).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from qcowlib.core.disk import Disk, Extent, ExtentKind
from qcowlib.core.hostfile import HostFile
from qcowlib.core.secrets import image_key
from qcowlib.errors import InvalidArgument, QcowlibError, TruncatedImage
from qcowlib.formats.luks import codec

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy
    from qcowlib.formats.luks.crypto import SectorCipher

SECTOR = codec.SECTOR


class LuksDisk(Disk):
    """A LUKS1 volume (the key, when given, unlocks it on open)."""

    format = "luks"
    encrypted = True

    def __init__(self, host: HostFile, filename: str) -> None:
        self.host = host
        self.filename = filename
        if host.size < codec.HEADER_SIZE:
            raise TruncatedImage("LUKS header is truncated", file=filename, structure="luks")
        try:
            self.header = codec.parse_header(host.pread(0, codec.HEADER_SIZE), host.size)
        except QcowlibError as exc:
            raise exc.with_file(filename) from None
        self.virtual_size = host.size - self.header.payload_offset
        self._cipher: SectorCipher | None = None
        key = image_key(filename)
        if key is not None:
            self._cipher = unlock_cipher(self.header, key, host.pread, filename)

    def info_tail(self) -> dict[str, Any]:
        return {
            "format-specific": {"type": "luks", "data": codec.info(self.header)},
            "encrypted": True,
            "dirty-flag": False,
        }

    def _need_key(self) -> SectorCipher:
        if self._cipher is None:
            raise InvalidArgument(
                "Parameter 'key-secret' is required for cipher (give it with "
                "--object secret,id=ID,data=... --image-opts "
                "driver=luks,file.filename=FILE,key-secret=ID)",
                file=self.filename,
            )
        return self._cipher

    def layer_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        self._need_key()
        start, end = self._range(offset, length)
        if start < end:
            yield Extent(start, end - start, ExtentKind.DATA)

    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        cipher = self._need_key()
        first = ext.start // SECTOR * SECTOR
        last = -(-ext.end // SECTOR) * SECTOR
        raw = self.host.pread_exact(
            self.header.payload_offset + first, last - first, "luks payload"
        )
        if first == ext.start and last == ext.end:  # whole sectors: straight into buf
            cipher.decrypt_into(raw, first // SECTOR, buf)
            return
        plain = cipher.decrypt(raw, first // SECTOR)
        buf[:] = plain[ext.start - first : ext.end - first]

    def _close_layer(self) -> None:
        self.host.close()


def unlock_cipher(h: codec.LuksHeader, key: bytes, read: Any, filename: str) -> SectorCipher:
    """The payload cipher for header ``h``, its master key unlocked with ``key``."""
    from qcowlib.formats.luks.crypto import SectorCipher, unlock

    try:
        return SectorCipher(h.cipher, unlock(h, key, read))
    except QcowlibError as exc:
        raise exc.with_file(filename) from None


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> LuksDisk:
    """The registry's opener."""
    return LuksDisk(host, path)
