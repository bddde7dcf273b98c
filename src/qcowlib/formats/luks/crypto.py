"""Sector ciphers for LUKS payloads and key material, with the ``cryptography`` package.

``cryptography`` is an optional dependency (``pip install qcowlib[crypto]``): only
reading encrypted data needs it; ``info`` of an encrypted image does not.  Sectors are
512 bytes (LUKS1 knows no other size; :class:`SectorCipher` also takes other multiples
of 16, such as LUKS2's 4096); the IV of sector *n* comes from *n* as QEMU's IV
generators make it (``plain``: 32-bit little-endian, ``plain64``: 64-bit, ``essiv``:
the 64-bit value encrypted with the hash of the key).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from qcowlib.errors import InvalidArgument, UnsupportedFeature
from qcowlib.formats.luks import blockmodes
from qcowlib.formats.luks.codec import (
    SECTOR,
    Cipher,
    LuksHeader,
    af_merge,
    is_master_key,
    material_length,
    slot_key,
)

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from qcowlib.formats.luks.blockmodes import Words

    Buffer = bytes | NDArray[np.uint8]


def _backend() -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher as C
        from cryptography.hazmat.primitives.ciphers import algorithms, modes
    except ImportError:
        raise UnsupportedFeature(
            "reading encrypted images needs the 'cryptography' package "
            "(pip install 'qcowlib[crypto]')"
        ) from None
    return C, algorithms, modes


#: Bytes decrypted per ECB call: the tweak and scratch arrays of a run (a few times this
#: size) stay in the CPU cache (1 MiB runs measured 4 times slower tweaks than 256 KiB).
_RUN: Final = 1 << 18


class SectorCipher:
    """Decrypts runs of sectors of one LUKS payload with its master key.

    Every mode runs as one AES-ECB call over the whole run plus numpy XOR masks
    (:mod:`.blockmodes`), not as one cipher object per sector.
    """

    def __init__(self, cipher: Cipher, key: bytes, sector_size: int = SECTOR) -> None:
        self._c, self._alg, self._modes = _backend()
        self.cipher = cipher
        self.key = key
        self.sector_size = sector_size
        self._per_sector = blockmodes.blocks_per_sector(sector_size)
        self._essiv_key: bytes | None = None
        if cipher.ivgen == "essiv":
            assert cipher.ivgen_hash is not None  # parse_cipher
            self._essiv_key = hashlib.new(cipher.ivgen_hash, key).digest()
            _check_aes_key(self._essiv_key, f"ESSIV hash {cipher.ivgen_hash}")
        if cipher.mode == "xts":
            # IEEE 1619: the first half encrypts the data, the second the tweaks.
            half = len(key) // 2
            self._k1, self._k2 = key[:half], key[half:]
            _check_aes_key(key if len(key) % 2 else self._k1, "XTS master key half")
        else:
            self._k1 = self._k2 = key
            _check_aes_key(key, "master key")

    def _ecb(self, key: bytes, *, decrypt: bool) -> Any:
        cipher = self._c(self._alg.AES(key), self._modes.ECB())
        return cipher.decryptor() if decrypt else cipher.encryptor()

    def _ivs(self, first: int, count: int) -> Buffer:
        """The IVs of ``count`` sectors from ``first``, 16 bytes each."""
        ivs = blockmodes.octets(blockmodes.sector_ivs(first, count, self.cipher.ivgen))
        if self._essiv_key is None:
            return ivs
        return self._ecb(self._essiv_key, decrypt=False).update(ivs)  # type: ignore[no-any-return]

    def decrypt(self, data: bytes | bytearray | memoryview, first_sector: int) -> bytes:
        """``data`` (whole sectors) decrypted, its first sector being ``first_sector``.

        Raises :class:`InvalidArgument` when ``data`` is not whole sectors.
        """
        out = bytearray(len(data))
        self.decrypt_into(data, first_sector, memoryview(out))
        return bytes(out)

    def decrypt_into(
        self, data: bytes | bytearray | memoryview, first_sector: int, out: memoryview
    ) -> None:
        """Decrypt ``data`` (whole sectors, the first being ``first_sector``) into
        ``out``, a writable buffer of the same length (``data`` itself will do).

        Raises :class:`InvalidArgument` when ``data`` is not whole sectors or ``out``
        has another length.
        """
        size = self.sector_size
        if len(data) % size:
            raise InvalidArgument(f"encrypted data must be whole {size}-byte sectors")
        if out.nbytes != len(data):
            raise InvalidArgument("decryption output must be as long as its input")
        view, target = memoryview(data).cast("B"), out.cast("B")
        run = max(_RUN // size, 1) * size
        # Scratch of one run, reused: the masked ciphertext and the ECB output (which
        # the cryptography package wants one block longer than its input).
        scratch = np.empty(2 * (run // 8) + 2, dtype=np.uint64)
        for at in range(0, len(data), run):
            part = view[at : at + run]
            dest = blockmodes.words(target[at : at + len(part)])
            self._decrypt_run(part, first_sector + at // size, dest, scratch)

    def _decrypt_run(self, data: memoryview, first: int, out: Words, scratch: Words) -> None:
        n = len(data) // 8
        masked, plain = scratch[:n], scratch[n:]
        cipher = blockmodes.words(data)
        dec = self._ecb(self._k1, decrypt=True)
        if self.cipher.mode == "ecb":
            dec.update_into(data, blockmodes.octets(plain))
            out[:] = plain[:n]
            return
        ivs = self._ivs(first, len(data) // self.sector_size)
        if self.cipher.mode == "cbc":
            dec.update_into(data, blockmodes.octets(plain))
            blockmodes.cbc_unchain(plain[:n], cipher, blockmodes.words(ivs), self._per_sector, out)
            return
        first_tweaks = self._ecb(self._k2, decrypt=False).update(ivs)
        tweaks = blockmodes.xts_tweaks(first_tweaks, self._per_sector)
        np.bitwise_xor(cipher, tweaks, out=masked)
        dec.update_into(blockmodes.octets(masked), blockmodes.octets(plain))
        np.bitwise_xor(plain[:n], tweaks, out=out)


def _check_aes_key(key: bytes, what: str) -> None:
    if len(key) not in (16, 24, 32):
        raise UnsupportedFeature(
            f"LUKS {what} of {len(key)} bytes is not an AES key (16, 24 or 32 bytes)"
        )


def unlock(h: LuksHeader, passphrase: bytes, read: Any) -> bytes:
    """The master key, from the first active slot ``passphrase`` opens.

    ``read(offset, length)`` returns bytes of the LUKS header's container (the file, or
    the qcow2 crypto area) at a key-material offset.  Raises :class:`InvalidArgument`
    when no slot accepts the passphrase (QEMU: "Invalid password, cannot unlock any
    keyslot").
    """
    for slot in h.slots:
        if not slot.active:
            continue
        material = read(slot.key_offset, material_length(h, slot))
        split = SectorCipher(h.cipher, slot_key(passphrase, h, slot)).decrypt(material, 0)
        key = af_merge(split, h.key_bytes, slot.stripes, h.hash)
        if is_master_key(key, h):
            return key
    raise InvalidArgument("Invalid password, cannot unlock any keyslot")
