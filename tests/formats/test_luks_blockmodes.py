"""The vectorised sector ciphers against the ``cryptography`` package's own modes, one
cipher object per sector (what qcowlib did before), and the XTS tweak arithmetic against
a plain-integer GF(2**128) doubling."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowlib.errors import InvalidArgument, UnsupportedFeature
from qcowlib.formats.luks import blockmodes, crypto
from qcowlib.formats.luks.codec import parse_cipher

cryptography = pytest.importorskip("cryptography")
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402

MASK64 = (1 << 64) - 1

#: First sectors: small, around 2**32 (where ``plain`` wraps) and up to 2**64 (where
#: ``plain64`` wraps inside a buffer).
FIRST_SECTORS = st.one_of(
    st.integers(0, 1 << 20),
    st.integers((1 << 32) - 70, (1 << 32) + 70),
    st.integers(0, MASK64),
    st.integers(MASK64 - 70, MASK64),
)


def _reference_iv(sector: int, ivgen: str, key: bytes) -> bytes:
    value = sector & (0xFFFFFFFF if ivgen == "plain" else MASK64)
    iv = value.to_bytes(16, "little")
    if ivgen == "essiv":
        essiv = Cipher(algorithms.AES(hashlib.sha256(key).digest()), modes.ECB())
        iv = essiv.encryptor().update(iv)
    return iv


def _reference(mode: str, ivgen: str, key: bytes, data: bytes, first: int, size: int) -> bytes:
    if mode == "ecb":
        return Cipher(algorithms.AES(key), modes.ECB()).decryptor().update(data)
    out = b""
    for i in range(len(data) // size):
        iv = _reference_iv(first + i, ivgen, key)
        m = modes.XTS(iv) if mode == "xts" else modes.CBC(iv)
        out += Cipher(algorithms.AES(key), m).decryptor().update(data[i * size : (i + 1) * size])
    return out


@settings(max_examples=200, deadline=None)
@given(
    mode=st.sampled_from(["xts", "cbc", "ecb"]),
    ivgen=st.sampled_from(["plain", "plain64", "essiv"]),
    key_bits=st.sampled_from([128, 256]),
    size=st.sampled_from([512, 4096, 16, 48]),
    first=FIRST_SECTORS,
    count=st.integers(1, 80),
    seed=st.binary(min_size=64, max_size=64),
)
def test_sectors_decrypt_as_cryptography_decrypts_them_one_by_one(
    mode: str, ivgen: str, key_bits: int, size: int, first: int, count: int, seed: bytes
) -> None:
    # AES-128-XTS and AES-256-XTS take 256- and 512-bit keys; CBC the AES key itself.
    key_bytes = key_bits // 8 * (2 if mode == "xts" else 1)
    key = seed[:key_bytes]
    spec = f"{mode}-{ivgen}:sha256" if ivgen == "essiv" else f"{mode}-{ivgen}"
    spec = "ecb" if mode == "ecb" else spec
    cipher = crypto.SectorCipher(parse_cipher("aes", spec, key_bytes), key, size)
    data = np.random.default_rng(int.from_bytes(seed[-8:], "little")).bytes(count * size)
    expected = _reference(mode, ivgen, key, data, first, size)
    assert cipher.decrypt(data, first) == expected
    in_place = bytearray(data)  # decrypt_into may write over its own input
    cipher.decrypt_into(in_place, first, memoryview(in_place))
    assert in_place == expected


def test_runs_longer_than_one_ecb_call_decrypt_alike() -> None:
    # Past crypto._RUN the buffer is cut into runs: the sector numbers must carry over.
    key = bytes(range(64))
    cipher = crypto.SectorCipher(parse_cipher("aes", "xts-plain64", 64), key)
    count = crypto._RUN // 512 + 5
    data = np.random.default_rng(7).bytes(count * 512)
    first = MASK64 - crypto._RUN // 512  # plain64 wraps in the second run
    got = cipher.decrypt(memoryview(data), first)
    assert got == _reference("xts", "plain64", key, data, first, 512)


def _double(t: int) -> int:
    """XTS multiplication by alpha of a little-endian 128-bit value (IEEE 1619 5.2)."""
    t <<= 1
    return (t ^ 0x87) & ((1 << 128) - 1) if t >> 128 else t


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=6), st.integers(1, 300))
def test_tweaks_are_repeated_doublings(first_tweaks: list[bytes], per_sector: int) -> None:
    words = blockmodes.xts_tweaks(b"".join(first_tweaks), per_sector)
    got = blockmodes.octets(words).tobytes()
    expected = b""
    for raw in first_tweaks:
        t = int.from_bytes(raw, "little")
        for _ in range(per_sector):
            expected += t.to_bytes(16, "little")
            t = _double(t)
    assert got == expected


def test_bad_sizes_and_keys_are_our_errors() -> None:
    xts = parse_cipher("aes", "xts-plain64", 64)
    with pytest.raises(InvalidArgument, match="multiple of the 16-byte"):
        crypto.SectorCipher(xts, bytes(64), 520)
    with pytest.raises(InvalidArgument, match="whole 512-byte sectors"):
        crypto.SectorCipher(xts, bytes(64)).decrypt(bytes(1000), 0)
    with pytest.raises(InvalidArgument, match="as long as its input"):
        crypto.SectorCipher(xts, bytes(64)).decrypt_into(bytes(1024), 0, memoryview(bytearray(512)))
    with pytest.raises(UnsupportedFeature, match="not an AES key"):
        crypto.SectorCipher(parse_cipher("aes", "cbc-plain64", 20), bytes(20))
    with pytest.raises(UnsupportedFeature, match="not an AES key"):
        crypto.SectorCipher(parse_cipher("aes", "xts-plain64", 40), bytes(40))
    with pytest.raises(UnsupportedFeature, match="ESSIV hash sha1"):
        crypto.SectorCipher(parse_cipher("aes", "cbc-essiv:sha1", 32), bytes(32))
