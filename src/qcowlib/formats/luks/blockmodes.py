"""Sector IVs, XTS tweaks and CBC chaining over whole buffers, with numpy (pure).

A sector cipher (LUKS1, "LUKS On-Disk Format Specification" 1.2.3, section 2.4; IEEE
1619-2007 for XTS) gives every sector its own IV, so a mode object per sector is the
obvious way to decrypt, and a slow one (two million of them per GiB).  The modes are
only AES-ECB plus XOR masks, so :mod:`.crypto` runs one ECB call over a whole buffer
and takes the masks from here:

- IVs: sector *n* as a 16-byte little-endian value (``plain``: *n* mod 2**32,
  ``plain64``: *n* mod 2**64), as QEMU's ``crypto/ivgen-plain*.c`` make them;
- XTS: block *j* of a sector is masked with ``T_j = E_K2(IV) * alpha**j`` in GF(2**128)
  (the 16 bytes read as a little-endian 128-bit value; multiplying by alpha shifts left
  one bit and XORs 0x87 into the low byte when a bit falls off the top), and
  ``P = D_K1(C xor T_j) xor T_j``;
- CBC: ``P_j = D_K(C_j) xor C_(j-1)``, ``C_(-1)`` being the sector's IV.

Blocks are 16 bytes (AES); a sector is a whole number of blocks.  128-bit values are
pairs of uint64 (low word first), stored little-endian so their bytes are the
cipher's bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import numpy as np

from qcowlib.errors import InvalidArgument

if TYPE_CHECKING:
    from numpy.typing import NDArray

    Words = NDArray[np.uint64]

BLOCK: Final = 16
_LE: Final = np.dtype("<u8")
_MASK64: Final = (1 << 64) - 1
#: Tweaks are made this many blocks at a time from one base (shifts stay < 64 bits and
#: the reduction of the bits shifted out, times 0x87, still fits in the low word).
_GROUP: Final = 32


def words(data: bytes | bytearray | memoryview | NDArray[Any]) -> Words:
    """``data`` (whole blocks) as uint64 words whose bytes are ``data``'s, read-only
    unless ``data`` is writable."""
    if isinstance(data, np.ndarray):
        return data.view(np.uint64)
    return np.frombuffer(data, dtype=np.uint64)


def octets(w: Words) -> NDArray[np.uint8]:
    """The bytes of words ``w`` (a buffer the ``cryptography`` package accepts)."""
    return w.view(np.uint8)


def blocks_per_sector(sector_size: int) -> int:
    """AES blocks in a sector; raises :class:`InvalidArgument` unless ``sector_size`` is
    a positive multiple of 16 (no ciphertext stealing)."""
    if sector_size <= 0 or sector_size % BLOCK:
        raise InvalidArgument(
            f"sector size {sector_size} is not a positive multiple of the 16-byte cipher block"
        )
    return sector_size // BLOCK


def sector_ivs(first: int, count: int, ivgen: str | None) -> Words:
    """The ``plain``/``plain64`` IVs of sectors ``first .. first+count-1``, as
    ``count`` 16-byte blocks (2 * ``count`` words, little-endian storage)."""
    mask = 0xFFFFFFFF if ivgen == "plain" else _MASK64
    ivs = np.zeros((count, 2), dtype=_LE)
    # uint64 arithmetic wraps at 2**64 as plain64 does; plain keeps the low 32 bits.
    low = np.arange(count, dtype=np.uint64) + np.uint64(first & _MASK64)
    ivs[:, 0] = low & np.uint64(mask)
    return words(ivs.reshape(-1))


def _times_x_power(lo: Words, hi: Words, k: Words) -> tuple[Words, Words]:
    """``(lo, hi) * alpha**k`` for ``0 <= k <= _GROUP`` (arrays broadcast)."""
    # (v >> 1) >> (63 - k) is v >> (64 - k), also for k = 0 (numpy shifts by 64 are
    # undefined).
    spill = (hi >> np.uint64(1)) >> (np.uint64(63) - k)
    new_hi = (hi << k) | ((lo >> np.uint64(1)) >> (np.uint64(63) - k))
    # x**128 = x**7 + x**2 + x + 1: the bits shifted out come back times 0x87.
    reduced = spill ^ (spill << np.uint64(1)) ^ (spill << np.uint64(2)) ^ (spill << np.uint64(7))
    return (lo << k) ^ reduced, new_hi


def xts_tweaks(first_tweaks: bytes | bytearray | memoryview, per_sector: int) -> Words:
    """Every block's tweak ``T_j = T_0 * alpha**j`` from the sectors' encrypted IVs
    ``T_0`` (16 bytes a sector): ``2 * per_sector`` words a sector, in block order,
    stored little-endian (XOR them with :func:`words` of the data)."""
    t0 = np.frombuffer(first_tweaks, dtype=_LE).reshape(-1, 2)
    lo, hi = t0[:, 0].astype(np.uint64), t0[:, 1].astype(np.uint64)
    out = np.empty((len(t0), per_sector, 2), dtype=np.uint64)
    ks = np.arange(_GROUP, dtype=np.uint64)
    for start in range(0, per_sector, _GROUP):
        n = min(_GROUP, per_sector - start)
        glo, ghi = _times_x_power(lo[:, None], hi[:, None], ks[None, :n])
        out[:, start : start + n, 0] = glo
        out[:, start : start + n, 1] = ghi
        if start + _GROUP < per_sector:
            lo, hi = _times_x_power(lo, hi, ks[-1:] + np.uint64(1))
    return words(out.astype(_LE, copy=False).reshape(-1))


def cbc_unchain(decrypted: Words, cipher: Words, ivs: Words, per_sector: int, out: Words) -> None:
    """CBC's plaintext into ``out`` from ``decrypted`` (the ECB decryption of ``cipher``):
    each block XORed with the previous ciphertext block, a sector's first with its IV.
    ``out`` may be ``cipher`` itself."""
    d = decrypted.reshape(-1, per_sector * 2)
    c = cipher.reshape(-1, per_sector * 2)
    o = out.reshape(-1, per_sector * 2)
    # numpy sees the overlap when out is cipher and buffers the read side.
    np.bitwise_xor(d[:, 2:], c[:, :-2], out=o[:, 2:])
    np.bitwise_xor(d[:, :2], ivs.reshape(-1, 2), out=o[:, :2])
