"""qcow2 header extensions (QEMU ``docs/interop/qcow2.txt``, "Header extensions").

Pure: :func:`parse_extensions` walks the extension area after the fixed header,
:func:`decode_known` reads the extensions qcowlib understands (backing format, external
data file, bitmaps, crypto, feature names), and :func:`encode_extensions` writes the
area back, unknown extensions included.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final, NamedTuple

from qcowlib.errors import CorruptImage
from qcowlib.formats._record import FixedLayout

__all__ = [
    "EXT_BACKING_FORMAT",
    "EXT_BITMAPS",
    "EXT_CRYPTO",
    "EXT_DATA_FILE",
    "EXT_END",
    "EXT_FEATURE_TABLE",
    "MAX_EXTENSION_LENGTH",
    "BitmapsExtension",
    "CryptoExtension",
    "HeaderExtension",
    "KnownExtensions",
    "bitmaps_extension",
    "decode_known",
    "decode_name",
    "encode_extensions",
    "extension",
    "feature_names",
    "feature_table_extension",
    "parse_extensions",
]

#: A header extension with this much data or more is refused (they all fit a cluster
#: of the largest size, 2 MiB).
MAX_EXTENSION_LENGTH: Final = 1 << 21
EXT_END: Final = 0x00000000
EXT_BACKING_FORMAT: Final = 0xE2792ACA
EXT_FEATURE_TABLE: Final = 0x6803F857
EXT_BITMAPS: Final = 0x23852875
EXT_CRYPTO: Final = 0x0537BE77
EXT_DATA_FILE: Final = 0x44415441

_ExtensionHead = struct.Struct(">II")
_FeatureNameEntry = FixedLayout(
    "feature name table entry", ">", [("type", "B"), ("bit", "B"), ("name", "46s")]
)
_BitmapsExt = FixedLayout(
    "bitmaps extension",
    ">",
    [
        ("nb_bitmaps", "I"),
        ("reserved32", "I"),
        ("bitmap_directory_size", "Q"),
        ("bitmap_directory_offset", "Q"),
    ],
)
_CryptoExt = FixedLayout("crypto extension", ">", [("offset", "Q"), ("length", "Q")])


class HeaderExtension(NamedTuple):
    """One header extension as stored: its type and raw data (unknown ones are kept)."""

    type: int
    data: bytes


class BitmapsExtension(NamedTuple):
    """The bitmaps header extension (``nb_bitmaps`` and where the directory lies)."""

    nb_bitmaps: int
    bitmap_directory_size: int
    bitmap_directory_offset: int


class CryptoExtension(NamedTuple):
    """Full disk encryption header pointer."""

    offset: int
    length: int


class KnownExtensions(NamedTuple):
    """What the extensions qcowlib understands say (None where absent)."""

    backing_format: str | None = None
    data_file: str | None = None
    bitmaps: BitmapsExtension | None = None
    crypto: CryptoExtension | None = None


def decode_name(raw: bytes, what: str, *, path: bool = False) -> str:
    """A NUL-padded UTF-8 name stored in the header area.

    A file name (``path``) is bytes on disk, as QEMU uses it: bytes that are not UTF-8
    (a name in another encoding) are kept as surrogates, which ``os`` functions and
    :func:`encode_path` turn back into the same bytes.
    """
    raw = raw.split(b"\0", 1)[0]
    if path:
        return raw.decode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptImage(f"{what} is not valid UTF-8", structure="header") from None


def encode_path(name: str) -> bytes:
    """A file name's bytes as stored (see :func:`decode_name`)."""
    return name.encode("utf-8", "surrogateescape")


def walk_extensions(data: bytes, start: int, limit: int) -> Iterator[tuple[int, int, int]]:
    """``(offset, type, length)`` of each header extension from ``start``, the end marker
    (type :data:`EXT_END`) last; the walk also ends where ``limit`` leaves no room for one.

    Raises :class:`CorruptImage` at an extension that overruns ``limit``.
    """
    offset = start
    # No room for an end marker: QEMU treats running out of the header area as the end
    # of the list.
    while offset + 8 <= limit:
        ext_type, length = _ExtensionHead.unpack_from(data, offset)
        if ext_type != EXT_END and (length > MAX_EXTENSION_LENGTH or offset + 8 + length > limit):
            raise CorruptImage(
                f"header extension {ext_type:#x} of length {length} overruns the header area",
                structure="header extension",
                field="length",
                offset=offset + 4,
            )
        yield offset, ext_type, length
        if ext_type == EXT_END:
            return
        offset += 8 + ((length + 7) & ~7)


def parse_extensions(data: bytes, start: int, limit: int) -> tuple[list[HeaderExtension], int]:
    """The extension list from ``start`` to the end marker (or ``limit``), and the first
    byte after the list."""
    extensions: list[HeaderExtension] = []
    end = start
    for offset, ext_type, length in walk_extensions(data, start, limit):
        if ext_type == EXT_END:
            return extensions, offset + 8
        extensions.append(HeaderExtension(ext_type, bytes(data[offset + 8 : offset + 8 + length])))
        end = offset + 8 + ((length + 7) & ~7)
    return extensions, end


def feature_names(extensions: list[HeaderExtension]) -> tuple[tuple[int, int, str], ...]:
    """The feature name table's entries as (type, bit, name)."""
    names: list[tuple[int, int, str]] = []
    for ext in extensions:
        if ext.type != EXT_FEATURE_TABLE:
            continue
        for i in range(len(ext.data) // 48):
            entry = _FeatureNameEntry.parse(ext.data[i * 48 : (i + 1) * 48])
            name = entry.name.split(b"\0", 1)[0].decode("utf-8", "replace")
            names.append((entry.type, entry.bit, name))
    return tuple(names)


def decode_known(extensions: list[HeaderExtension]) -> KnownExtensions:
    """Decode the backing format, data file, bitmaps and crypto extensions (the last of
    each type wins, as in QEMU)."""
    backing_format = data_file = None
    bitmaps = crypto = None
    for ext in extensions:
        if ext.type == EXT_BACKING_FORMAT:
            backing_format = decode_name(ext.data, "backing format")
        elif ext.type == EXT_DATA_FILE:
            data_file = decode_name(ext.data, "external data file name", path=True)
        elif ext.type == EXT_BITMAPS:
            if len(ext.data) < _BitmapsExt.sizeof():
                raise CorruptImage("bitmaps extension is too short", structure="bitmaps extension")
            b = _BitmapsExt.parse(ext.data)
            bitmaps = BitmapsExtension(
                b.nb_bitmaps, b.bitmap_directory_size, b.bitmap_directory_offset
            )
        elif ext.type == EXT_CRYPTO:
            if len(ext.data) < _CryptoExt.sizeof():
                raise CorruptImage("crypto extension is too short", structure="crypto extension")
            c = _CryptoExt.parse(ext.data)
            crypto = CryptoExtension(c.offset, c.length)
    return KnownExtensions(backing_format, data_file, bitmaps, crypto)


def encode_extensions(extensions: tuple[HeaderExtension, ...]) -> bytes:
    """The extension area: each extension padded to 8 bytes, then the end marker."""
    out = bytearray()
    for ext in extensions:
        out += _ExtensionHead.pack(ext.type, len(ext.data))
        out += ext.data
        out += bytes(-len(ext.data) % 8)
    out += _ExtensionHead.pack(EXT_END, 0)
    return bytes(out)


def extension(ext_type: int, data: bytes) -> HeaderExtension:
    """Build a header extension value."""
    return HeaderExtension(ext_type, data)


def bitmaps_extension(b: BitmapsExtension) -> HeaderExtension:
    """Encode the bitmaps extension."""
    return HeaderExtension(
        EXT_BITMAPS,
        _BitmapsExt.build(
            {
                "nb_bitmaps": b.nb_bitmaps,
                "reserved32": 0,
                "bitmap_directory_size": b.bitmap_directory_size,
                "bitmap_directory_offset": b.bitmap_directory_offset,
            }
        ),
    )


def feature_table_extension(entries: list[tuple[int, int, str]]) -> HeaderExtension:
    """Encode a feature name table."""
    data = b"".join(
        _FeatureNameEntry.build({"type": t, "bit": b, "name": n.encode().ljust(46, b"\0")})
        for t, b, n in entries
    )
    return HeaderExtension(EXT_FEATURE_TABLE, data)
