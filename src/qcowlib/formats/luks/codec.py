"""LUKS1 headers and key slots ("LUKS On-Disk Format Specification" 1.2.3), pure.

Bytes in, values out: the header and its eight key slots, the checks QEMU's
``qcrypto_block_luks_open`` applies before it trusts them, the information ``qemu-img
info`` shows without a key, and the anti-forensic merge (``AF_merge``) and key checks
used to unlock a slot.  Ciphers themselves live in :mod:`.crypto` (an optional
dependency).
"""

from __future__ import annotations

import struct
from typing import Any, Final, NamedTuple

from qcowlib.core.qdict import qdict_order
from qcowlib.errors import CorruptImage, FormatError, UnsupportedFeature
from qcowlib.formats._record import FixedLayout
from qcowlib.formats.luks.probe import LUKS_MAGIC

# hashlib (OpenSSL) and uuid are imported where a key is derived: validate reads these
# layouts for every image it checks, and must start fast (DESIGN.md).

LUKS_VERSION: Final = 1
SECTOR: Final = 512
KEY_SLOTS: Final = 8
KEY_ENABLED: Final = 0x00AC71F3
KEY_DISABLED: Final = 0x0000DEAD
DIGEST_SIZE: Final = 20
#: QEMU's caps: no slot may need more than this many stripes, nor a key this long.
MAX_STRIPES: Final = 4000
MAX_KEY_BYTES: Final = 64
#: PBKDF2 iteration counts above this are refused before any work (a crafted header
#: could otherwise make unlocking run for days); QEMU's defaults reach a few million.
MAX_ITERATIONS: Final = 1 << 28

HEADER = FixedLayout(
    "luks header",
    ">",
    [
        ("magic", "6s"),
        ("version", "H"),
        ("cipher_name", "32s"),
        ("cipher_mode", "32s"),
        ("hash_spec", "32s"),
        ("payload_offset", "I"),
        ("key_bytes", "I"),
        ("mk_digest", "20s"),
        ("mk_digest_salt", "32s"),
        ("mk_digest_iter", "I"),
        ("uuid", "40s"),
    ],
)
KEY_SLOT = FixedLayout(
    "luks key slot",
    ">",
    [
        ("active", "I"),
        ("iterations", "I"),
        ("salt", "32s"),
        ("key_material_offset", "I"),
        ("stripes", "I"),
    ],
)
HEADER_SIZE: Final = HEADER.sizeof() + KEY_SLOTS * KEY_SLOT.sizeof()  # 592

_HASHES: Final = ("sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")
_MODES: Final = ("ecb", "cbc", "xts")
_IVGENS: Final = ("plain", "plain64", "essiv")
_AES_KEY_BYTES: Final = (16, 24, 32)


class KeySlot(NamedTuple):
    active: bool
    iterations: int
    salt: bytes
    key_offset: int  # bytes
    stripes: int


class Cipher(NamedTuple):
    """A parsed ``cipher_name``/``cipher_mode`` pair (``aes``, ``xts-plain64``)."""

    name: str
    mode: str
    ivgen: str | None
    ivgen_hash: str | None
    key_bytes: int

    @property
    def alg(self) -> str:
        """QEMU's cipher algorithm name (``aes-256``: XTS keys are two keys)."""
        bits = self.key_bytes * 8 // (2 if self.mode == "xts" else 1)
        return f"{self.name}-{bits}"


class LuksHeader(NamedTuple):
    cipher: Cipher
    hash: str
    payload_offset: int  # bytes
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iter: int
    uuid: str
    slots: tuple[KeySlot, ...]

    @property
    def key_bytes(self) -> int:
        return self.cipher.key_bytes


def _cstr(raw: bytes, what: str, offset: int) -> str:
    text = raw.split(b"\0", 1)[0]
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise CorruptImage(
            f"LUKS {what} is not ASCII", structure="luks header", offset=offset
        ) from None


def parse_cipher(name: str, mode: str, key_bytes: int) -> Cipher:
    """``aes`` + ``xts-plain64`` (or ``cbc-essiv:sha256``...) as QEMU parses them."""
    mode_name, _, ivgen_spec = mode.partition("-")
    ivgen, _, ivgen_hash = ivgen_spec.partition(":")
    if mode_name not in _MODES:
        raise UnsupportedFeature(f"LUKS cipher mode {mode_name!r} is not supported")
    if mode_name != "ecb" and ivgen not in _IVGENS:
        raise UnsupportedFeature(f"LUKS IV generator {ivgen!r} is not supported")
    if ivgen == "essiv" and ivgen_hash not in _HASHES:
        raise UnsupportedFeature(f"LUKS ESSIV hash {ivgen_hash!r} is not supported")
    if not 1 <= key_bytes <= MAX_KEY_BYTES:
        raise CorruptImage(
            f"LUKS master key length {key_bytes} is invalid", structure="luks header"
        )
    return Cipher(
        name,
        mode_name,
        ivgen or None,
        ivgen_hash or None,
        key_bytes,
    )


def parse_header(data: bytes | bytearray | memoryview, file_size: int) -> LuksHeader:
    """The LUKS1 header at the start of ``data``, checked against the file size.

    Raises :class:`FormatError` for a bad magic, :class:`UnsupportedFeature` for LUKS2
    and for ciphers or hashes QEMU does not offer, :class:`CorruptImage` for slots or a
    payload that overlap, lie past the file or have impossible sizes.
    """
    h = HEADER.parse(data, 0)
    if h.magic != LUKS_MAGIC:
        raise FormatError("LUKS magic is missing", structure="luks header", offset=0)
    if h.version != LUKS_VERSION:
        raise UnsupportedFeature(
            f"LUKS version {h.version} is not supported (only LUKS1, as QEMU)",
            structure="luks header",
            field="version",
            offset=6,
        )
    hash_name = _cstr(h.hash_spec, "hash_spec", 72)
    if hash_name not in _HASHES:
        raise UnsupportedFeature(f"LUKS hash {hash_name!r} is not supported")
    cipher = parse_cipher(
        _cstr(h.cipher_name, "cipher_name", 8), _cstr(h.cipher_mode, "cipher_mode", 40), h.key_bytes
    )
    if cipher.name != "aes":
        raise UnsupportedFeature(f"LUKS cipher {cipher.name!r} is not supported (only aes)")
    _check_aes_sizes(cipher)
    slots = tuple(_slot(data, i, h.key_bytes, h.payload_offset, file_size) for i in range(8))
    payload = h.payload_offset * SECTOR
    if payload > file_size:
        raise CorruptImage(
            "LUKS payload offset lies past the end of the file",
            structure="luks header",
            field="payload_offset",
            offset=104,
        )
    if h.mk_digest_iter > MAX_ITERATIONS:
        raise CorruptImage("LUKS master key iteration count is too large", offset=168)
    return LuksHeader(
        cipher,
        hash_name,
        payload,
        h.mk_digest,
        h.mk_digest_salt,
        h.mk_digest_iter,
        _cstr(h.uuid, "uuid", 168),
        slots,
    )


def _check_aes_sizes(cipher: Cipher) -> None:
    """Refuse, as QEMU's ``qcrypto_block_luks_cipher_name_lookup`` and
    ``qcrypto_block_luks_essiv_cipher`` refuse, a master key (each half of an XTS key)
    or an ESSIV hash digest that is no AES key size."""
    bits = cipher.key_bytes // (2 if cipher.mode == "xts" else 1)
    if bits not in _AES_KEY_BYTES or (cipher.mode == "xts" and cipher.key_bytes % 2):
        raise UnsupportedFeature(
            f"Algorithm 'aes' with key size {bits} bytes not supported",
            structure="luks header",
            field="key_bytes",
            offset=108,
        )
    if cipher.ivgen_hash is not None:
        import hashlib

        digest = hashlib.new(cipher.ivgen_hash).digest_size
        if digest not in _AES_KEY_BYTES:
            raise UnsupportedFeature(
                f"No AES cipher with key size {digest} available (ESSIV {cipher.ivgen_hash})",
                structure="luks header",
                field="cipher_mode",
                offset=40,
            )


def _slot(data: Any, i: int, key_bytes: int, payload_sectors: int, file_size: int) -> KeySlot:
    at = HEADER.sizeof() + i * KEY_SLOT.sizeof()
    s = KEY_SLOT.parse(data[at:], at)
    where = f"LUKS key slot {i}"
    if s.active not in (KEY_ENABLED, KEY_DISABLED):
        raise CorruptImage(f"{where} has an invalid state", structure="luks header", offset=at)
    if s.stripes != MAX_STRIPES:
        raise CorruptImage(f"{where} has {s.stripes} stripes, not 4000", offset=at + 44)
    material_sectors = -(-key_bytes * s.stripes // SECTOR)
    if s.key_material_offset + material_sectors > payload_sectors:
        raise CorruptImage(f"{where} key material overlaps the payload", offset=at + 40)
    if s.active == KEY_ENABLED and s.iterations > MAX_ITERATIONS:
        raise CorruptImage(f"{where} iteration count is too large", offset=at + 4)
    return KeySlot(
        s.active == KEY_ENABLED, s.iterations, s.salt, s.key_material_offset * SECTOR, s.stripes
    )


def material_length(h: LuksHeader, slot: KeySlot) -> int:
    """Bytes of encrypted key material a slot occupies (whole sectors)."""
    return -(-h.key_bytes * slot.stripes // SECTOR) * SECTOR


def info(h: LuksHeader, *, embedded: bool = False) -> dict[str, Any]:
    """``qemu-img info``'s format-specific data (``embedded``: inside a qcow2's
    ``encrypt`` object, which adds ``"format": "luks"``), in qemu-img's key order."""
    values: dict[str, Any] = {
        "cipher-alg": h.cipher.alg,
        "cipher-mode": h.cipher.mode,
        "ivgen-alg": h.cipher.ivgen or "plain64",
        "hash-alg": h.hash,
        "payload-offset": h.payload_offset,
        "master-key-iters": h.mk_digest_iter,
        "uuid": h.uuid,
        "slots": [_slot_info(s) for s in h.slots],
    }
    if h.cipher.ivgen_hash:
        values["ivgen-hash-alg"] = h.cipher.ivgen_hash
    if embedded:
        values["format"] = "luks"
    return qdict_order(values)


def _slot_info(s: KeySlot) -> dict[str, Any]:
    if not s.active:
        return qdict_order({"active": False, "key-offset": s.key_offset})
    return qdict_order(
        {"active": True, "iters": s.iterations, "key-offset": s.key_offset, "stripes": s.stripes}
    )


def af_merge(material: bytes, key_bytes: int, stripes: int, hash_name: str) -> bytes:
    """The key the anti-forensic split ``material`` stands for (LUKS spec, ``AF_merge``)."""
    d = bytes(key_bytes)
    for i in range(stripes - 1):
        block = material[i * key_bytes : (i + 1) * key_bytes]
        d = _diffuse(_xor(d, block), hash_name)
    return _xor(d, material[(stripes - 1) * key_bytes : stripes * key_bytes])


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _diffuse(buf: bytes, hash_name: str) -> bytes:
    import hashlib

    size = hashlib.new(hash_name).digest_size
    out = bytearray()
    for i in range(-(-len(buf) // size)):
        chunk = buf[i * size : (i + 1) * size]
        out += hashlib.new(hash_name, struct.pack(">I", i) + chunk).digest()[: len(chunk)]
    return bytes(out)


def slot_key(passphrase: bytes, h: LuksHeader, slot: KeySlot) -> bytes:
    """The key that encrypts a slot's key material (PBKDF2 of the passphrase)."""
    import hashlib

    return hashlib.pbkdf2_hmac(h.hash, passphrase, slot.salt, slot.iterations, h.key_bytes)


def is_master_key(key: bytes, h: LuksHeader) -> bool:
    """Whether ``key`` matches the header's master key digest."""
    import hashlib

    digest = hashlib.pbkdf2_hmac(h.hash, key, h.mk_digest_salt, h.mk_digest_iter, DIGEST_SIZE)
    return digest == h.mk_digest


def new_uuid_string(raw: bytes) -> str:
    """A UUID string from 16 bytes (for tests that build headers)."""
    import uuid

    return str(uuid.UUID(bytes=raw))
