"""Sector ciphers for LUKS payloads and key material, with the ``cryptography`` package.

``cryptography`` is an optional dependency (``pip install qcowlib[crypto]``): only
reading encrypted data needs it; ``info`` of an encrypted image does not.  Sectors are
512 bytes; the IV of sector *n* comes from *n* as QEMU's IV generators make it
(``plain``: 32-bit little-endian, ``plain64``: 64-bit, ``essiv``: the 64-bit value
encrypted with the hash of the key).
"""

from __future__ import annotations

import hashlib
from typing import Any

from qcowlib.errors import InvalidArgument, UnsupportedFeature
from qcowlib.formats.luks.codec import (
    SECTOR,
    Cipher,
    LuksHeader,
    af_merge,
    is_master_key,
    material_length,
    slot_key,
)


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


class SectorCipher:
    """Decrypts runs of 512-byte sectors of one LUKS payload with its master key."""

    def __init__(self, cipher: Cipher, key: bytes) -> None:
        self._c, self._alg, self._modes = _backend()
        self.cipher = cipher
        self.key = key
        self._essiv = None
        if cipher.ivgen == "essiv":
            assert cipher.ivgen_hash is not None  # parse_cipher
            essiv_key = hashlib.new(cipher.ivgen_hash, key).digest()
            self._essiv = self._c(self._alg.AES(essiv_key), self._modes.ECB()).encryptor()

    def _iv(self, sector: int) -> bytes:
        if self.cipher.ivgen == "plain":
            return (sector & 0xFFFFFFFF).to_bytes(16, "little")
        iv = (sector & 0xFFFFFFFFFFFFFFFF).to_bytes(16, "little")
        if self._essiv is not None:
            iv = bytes(self._essiv.update(iv))
        return iv

    def decrypt(self, data: bytes | memoryview, first_sector: int) -> bytes:
        """``data`` (whole sectors) decrypted, its first sector being ``first_sector``."""
        if len(data) % SECTOR:
            raise InvalidArgument("encrypted data must be whole 512-byte sectors")
        aes, mode = self._alg.AES(self.key), self.cipher.mode
        if mode == "ecb":
            return bytes(self._c(aes, self._modes.ECB()).decryptor().update(bytes(data)))
        out = bytearray(len(data))
        view = memoryview(data)
        make = self._modes.XTS if mode == "xts" else self._modes.CBC
        for i in range(len(data) // SECTOR):
            at = i * SECTOR
            dec = self._c(aes, make(self._iv(first_sector + i))).decryptor()
            out[at : at + SECTOR] = dec.update(bytes(view[at : at + SECTOR]))
        return bytes(out)


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
