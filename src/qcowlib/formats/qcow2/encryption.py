"""LUKS encryption of qcow2 images (``crypt_method`` 2): the LUKS header in the crypto
header extension, unlocked with the key given the qemu-img way, and data clusters
decrypted with the *host* sector number as IV (QEMU's ``crypt_physical_offset``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qcowlib.core.hostfile import HostFile
from qcowlib.errors import CorruptImage, QcowlibError, UnsupportedFeature
from qcowlib.formats.qcow2 import header as hdr

if TYPE_CHECKING:
    from qcowlib.formats.luks.codec import LuksHeader
    from qcowlib.formats.luks.crypto import SectorCipher


def open_encryption(
    host: HostFile, h: hdr.Header, filename: str
) -> tuple[LuksHeader, ClusterCipher | None]:
    """The LUKS header of an encrypted qcow2 (and its unlocked cipher when a key is given).

    Only LUKS encryption is read; the legacy AES method is refused, as QEMU refuses it
    outside qemu-img.
    """
    from qcowlib.core.secrets import image_key
    from qcowlib.formats.luks import codec as luks
    from qcowlib.formats.luks.reader import unlock_cipher

    if h.crypt_method != hdr.CRYPT_LUKS:
        raise UnsupportedFeature(
            "qcow2 AES encryption (crypt_method 1) is not supported; convert the image "
            "with qemu-img to LUKS encryption or an unencrypted format",
            file=filename,
            structure="header",
            field="crypt_method",
        )
    c = h.crypto
    if c is None or c.offset + c.length > host.size or c.length < luks.HEADER_SIZE:
        raise CorruptImage(
            "encrypted qcow2 has no usable crypto header extension",
            file=filename,
            structure="crypto extension",
        )
    try:
        header = luks.parse_header(host.pread(c.offset, luks.HEADER_SIZE), c.length)
    except QcowlibError as exc:
        raise exc.with_file(filename) from None
    key = image_key(filename)
    if key is None:
        return header, None
    cipher = unlock_cipher(header, key, lambda at, n: host.pread(c.offset + at, n), filename)
    return header, ClusterCipher(cipher)


class ClusterCipher:
    """Decrypts qcow2 data: LUKS sectors whose IV is the *host* sector number (QEMU's
    ``crypt_physical_offset``)."""

    def __init__(self, cipher: SectorCipher) -> None:
        self.cipher = cipher

    def read(self, host: HostFile, offset: int, length: int) -> bytes | memoryview:
        """The plaintext of host bytes ``[offset, offset + length)``."""
        first = offset // 512 * 512
        last = -(-(offset + length) // 512) * 512
        raw = host.pread_exact(first, last - first, "encrypted cluster")
        plain = memoryview(bytearray(len(raw)))
        self.cipher.decrypt_into(raw, first // 512, plain)
        return plain[offset - first : offset - first + length]
