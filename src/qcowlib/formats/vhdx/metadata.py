"""VHDX metadata region: table, system items and the parent locator (MS-VHDX 2.6)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from qcowlib.errors import (
    CorruptImage,
    FormatError,
    QcowlibError,
    UnsupportedFeature,
)
from qcowlib.formats._layout import parse_fixed as _parse
from qcowlib.formats.vhdx.bat import chunk_ratio
from qcowlib.formats.vhdx.spec import (
    _METADATA_ENTRY_SIZE,
    _METADATA_SIGNATURE,
    LOCATOR_ENTRY,
    LOCATOR_HEADER,
    METADATA_ENTRY,
    METADATA_HEADER,
    VHDX_BLOCK_SIZE_MAX,
    VHDX_BLOCK_SIZE_MIN,
    VHDX_FILE_PARAMETERS,
    VHDX_KNOWN_METADATA,
    VHDX_LOGICAL_SECTOR_SIZE,
    VHDX_MAX_ENTRIES,
    VHDX_MAX_SIZE,
    VHDX_META_FLAGS_IS_REQUIRED,
    VHDX_META_FLAGS_IS_USER,
    VHDX_META_FLAGS_IS_VIRTUAL_DISK,
    VHDX_METADATA_TABLE_SIZE,
    VHDX_PAGE83,
    VHDX_PARAMS_HAS_PARENT,
    VHDX_PARAMS_LEAVE_BLOCKS_ALLOCATED,
    VHDX_PHYSICAL_SECTOR_SIZE,
    VHDX_VIRTUAL_DISK_SIZE,
    _build,
    guid_text,
)

if TYPE_CHECKING:
    # numpy is imported where the BAT is decoded, so that header work stays light.
    import numpy as np
    import numpy.typing as npt

    BatArray = npt.NDArray[np.uint64]


# ---------------------------------------------------------------------------------------
# metadata region (spec 2.6)


@dataclass(frozen=True)
class MetadataEntry:
    """A metadata table entry (QEMU ``VHDXMetadataTableEntry``)."""

    item_id: bytes
    offset: int
    length: int
    is_user: bool = False
    is_virtual_disk: bool = False
    is_required: bool = False


def parse_metadata_table(
    data: bytes, region_length: int, offset: int = 0
) -> tuple[MetadataEntry, ...]:
    """The entries of the 64 KiB metadata table at the start of the metadata region.

    ``region_length`` bounds the items; ``offset`` is the region's file offset.  Raises
    :class:`TruncatedImage` for short data, :class:`FormatError` without the
    ``metadata`` signature, :class:`CorruptImage` for more than 2047 entries, an item
    outside the region or one listed twice.
    """
    what = "vhdx metadata table"
    h = _parse(METADATA_HEADER, data, what, offset)
    if h.signature != _METADATA_SIGNATURE:
        raise FormatError(
            "VHDX metadata table signature 'metadata' is missing",
            structure=what,
            field="signature",
            offset=offset,
        )
    if h.entry_count > VHDX_MAX_ENTRIES:
        raise CorruptImage(
            f"VHDX metadata table has {h.entry_count} entries (limit {VHDX_MAX_ENTRIES})",
            structure=what,
            field="entry_count",
            offset=offset + 10,
        )
    entries: list[MetadataEntry] = []
    for i in range(h.entry_count):
        at = 32 + _METADATA_ENTRY_SIZE * i
        e = _parse(METADATA_ENTRY, data[at:], "vhdx metadata entry", offset + at)
        if e.length and (
            e.offset < VHDX_METADATA_TABLE_SIZE or e.offset + e.length > region_length
        ):
            raise CorruptImage(
                f"VHDX metadata item {guid_text(e.item_id)} lies outside its region",
                structure=what,
                field=f"entry[{i}].offset",
                offset=offset + at + 16,
            )
        if any(x.item_id == e.item_id for x in entries):
            raise CorruptImage(
                f"VHDX metadata item {guid_text(e.item_id)} is listed twice",
                structure=what,
                field=f"entry[{i}]",
                offset=offset + at,
            )
        entries.append(
            MetadataEntry(
                e.item_id,
                e.offset,
                e.length,
                is_user=bool(e.data_bits & VHDX_META_FLAGS_IS_USER),
                is_virtual_disk=bool(e.data_bits & VHDX_META_FLAGS_IS_VIRTUAL_DISK),
                is_required=bool(e.data_bits & VHDX_META_FLAGS_IS_REQUIRED),
            )
        )
    return tuple(entries)


def build_metadata_table(entries: Sequence[MetadataEntry]) -> bytes:
    """The 64 KiB metadata table of ``entries`` (no checksum: the spec has none)."""
    if len(entries) > VHDX_MAX_ENTRIES:
        raise FormatError("too many VHDX metadata entries", structure="vhdx metadata table")
    out = bytearray(
        _build(
            METADATA_HEADER,
            {"signature": _METADATA_SIGNATURE, "reserved": 0, "entry_count": len(entries)},
            "vhdx metadata table",
        )
    ).ljust(32, b"\0")
    for e in entries:
        bits = (
            (VHDX_META_FLAGS_IS_USER if e.is_user else 0)
            | (VHDX_META_FLAGS_IS_VIRTUAL_DISK if e.is_virtual_disk else 0)
            | (VHDX_META_FLAGS_IS_REQUIRED if e.is_required else 0)
        )
        out += _build(
            METADATA_ENTRY,
            {"item_id": e.item_id, "offset": e.offset, "length": e.length, "data_bits": bits},
            "vhdx metadata entry",
        ).ljust(_METADATA_ENTRY_SIZE, b"\0")
    return bytes(out.ljust(VHDX_METADATA_TABLE_SIZE, b"\0"))


@dataclass(frozen=True)
class Metadata:
    """The known metadata items (spec 2.6.2)."""

    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_disk_size: int
    logical_sector_size: int
    physical_sector_size: int
    page83: bytes

    @property
    def chunk_ratio(self) -> int:
        return chunk_ratio(self.block_size, self.logical_sector_size)


#: The sizes of the items QEMU requires (``META_ALL_PRESENT``), by GUID.
_ITEM_SIZES: Final = {
    VHDX_FILE_PARAMETERS: ("file parameters", 8),
    VHDX_VIRTUAL_DISK_SIZE: ("virtual disk size", 8),
    VHDX_PAGE83: ("page 83 data", 16),
    VHDX_LOGICAL_SECTOR_SIZE: ("logical sector size", 4),
    VHDX_PHYSICAL_SECTOR_SIZE: ("physical sector size", 4),
}


def _metadata(
    entries: Sequence[MetadataEntry], items: Mapping[bytes, bytes], offset: int
) -> tuple[Metadata | None, list[QcowlibError]]:
    """The known items and every problem found in them (None when there is one)."""
    by_id = {e.item_id: e for e in entries}
    values, found = _item_values(entries, items, offset, by_id)
    if len(values) < len(_ITEM_SIZES):
        return None, found

    def at(gid: bytes) -> int:
        return offset + by_id[gid].offset

    found += _value_problems(values, at)
    if found:
        return None, found
    params = values[VHDX_FILE_PARAMETERS]
    bits = int.from_bytes(params[4:8], "little")
    metadata = Metadata(
        block_size=int.from_bytes(params[:4], "little"),
        leave_blocks_allocated=bool(bits & VHDX_PARAMS_LEAVE_BLOCKS_ALLOCATED),
        has_parent=bool(bits & VHDX_PARAMS_HAS_PARENT),
        virtual_disk_size=int.from_bytes(values[VHDX_VIRTUAL_DISK_SIZE], "little"),
        logical_sector_size=int.from_bytes(values[VHDX_LOGICAL_SECTOR_SIZE], "little"),
        physical_sector_size=int.from_bytes(values[VHDX_PHYSICAL_SECTOR_SIZE], "little"),
        page83=values[VHDX_PAGE83],
    )
    return metadata, []


def _item_values(
    entries: Sequence[MetadataEntry],
    items: Mapping[bytes, bytes],
    offset: int,
    by_id: Mapping[bytes, MetadataEntry],
) -> tuple[dict[bytes, bytes], list[QcowlibError]]:
    """The bytes of each item QEMU requires, and the unknown required items and missing
    or short known ones."""
    what = "vhdx metadata"
    found: list[QcowlibError] = [
        UnsupportedFeature(
            f"VHDX has an unknown required metadata item {guid_text(e.item_id)}",
            structure=what,
            offset=offset + e.offset,
        )
        for e in entries
        if e.is_required and e.item_id not in VHDX_KNOWN_METADATA
    ]
    values: dict[bytes, bytes] = {}
    for gid, (name, size) in _ITEM_SIZES.items():
        entry = by_id.get(gid)
        raw = items.get(gid, b"")
        if entry is None or entry.length < size or len(raw) < size:
            found.append(
                CorruptImage(
                    f"VHDX metadata item '{name}' is missing or short",
                    structure=what,
                    field=name,
                    offset=offset + entry.offset if entry is not None else offset,
                )
            )
        else:
            values[gid] = bytes(raw[:size])
    return values, found


def _value_problems(
    values: Mapping[bytes, bytes], at: Callable[[bytes], int]
) -> list[QcowlibError]:
    """The block size, sector sizes and disk size out of their ranges."""
    what = "vhdx metadata"
    found: list[QcowlibError] = []
    block_size = int.from_bytes(values[VHDX_FILE_PARAMETERS][:4], "little")
    if (
        block_size < VHDX_BLOCK_SIZE_MIN
        or block_size > VHDX_BLOCK_SIZE_MAX
        or block_size & (block_size - 1)
    ):
        found.append(
            CorruptImage(
                f"VHDX block size {block_size} is not a power of two from 1 MiB to 256 MiB",
                structure=what,
                field="block_size",
                offset=at(VHDX_FILE_PARAMETERS),
            )
        )
    sizes = []
    for gid, name in (
        (VHDX_LOGICAL_SECTOR_SIZE, "logical_sector_size"),
        (VHDX_PHYSICAL_SECTOR_SIZE, "physical_sector_size"),
    ):
        n = int.from_bytes(values[gid], "little")
        if n not in (512, 4096):
            found.append(
                CorruptImage(
                    f"VHDX {name.replace('_', ' ')} {n} is not 512 or 4096",
                    structure=what,
                    field=name,
                    offset=at(gid),
                )
            )
        sizes.append(n)
    disk_size = int.from_bytes(values[VHDX_VIRTUAL_DISK_SIZE], "little")
    # Whole sectors only checked against a valid sector size (a 0 would divide by 0).
    if disk_size > VHDX_MAX_SIZE or (sizes[0] in (512, 4096) and disk_size % sizes[0]):
        found.append(
            CorruptImage(
                f"VHDX virtual disk size {disk_size} is above 64 TiB or not whole sectors",
                structure=what,
                field="virtual_disk_size",
                offset=at(VHDX_VIRTUAL_DISK_SIZE),
            )
        )
    return found


def metadata_problems(
    entries: Sequence[MetadataEntry], items: Mapping[bytes, bytes], offset: int = 0
) -> list[QcowlibError]:
    """Everything :func:`decode_metadata` refuses, in order (empty: it decodes)."""
    return _metadata(entries, items, offset)[1]


def decode_metadata(
    entries: Sequence[MetadataEntry], items: Mapping[bytes, bytes], offset: int = 0
) -> Metadata:
    """The known items, from the table ``entries`` and each item's bytes in ``items``.

    ``items`` maps item GUIDs to their bytes (read by the caller from the metadata
    region at ``offset`` + entry offset; at least the sizes the spec gives).  Raises
    :class:`UnsupportedFeature` for an unknown required item, :class:`CorruptImage`
    for a missing or short item, a block size that is not a power of two from 1 MiB to
    256 MiB, a sector size other than 512 or 4096, or a disk size that is not a
    multiple of the logical sector size or above 64 TiB.
    """
    metadata, problems = _metadata(entries, items, offset)
    if metadata is None:
        raise problems[0]
    return metadata


#: Key/value pairs read from one parent locator.
VHDX_MAX_LOCATOR_ENTRIES: Final = 256


def parse_parent_locator(data: bytes) -> dict[str, str]:
    """The key/value pairs of a parent locator item (spec 2.6.2.6), UTF-16LE decoded.

    Lenient: undecodable text is replaced, at most :data:`VHDX_MAX_LOCATOR_ENTRIES`
    pairs are read, and a key or value outside ``data`` reads as what of it is inside.
    Raises :class:`TruncatedImage` when ``data`` is shorter than the entries it lists.
    """
    h = _parse(LOCATOR_HEADER, data, "vhdx parent locator", 0)
    pairs: dict[str, str] = {}
    for i in range(min(h.key_value_count, VHDX_MAX_LOCATOR_ENTRIES)):
        at = 20 + 12 * i
        e = _parse(LOCATOR_ENTRY, data[at:], "vhdx parent locator entry", at)
        key = data[e.key_offset : e.key_offset + e.key_length]
        value = data[e.value_offset : e.value_offset + e.value_length]
        pairs[key.decode("utf-16-le", "replace")] = value.decode("utf-16-le", "replace")
    return pairs


def build_metadata_items(m: Metadata) -> tuple[tuple[MetadataEntry, ...], bytes]:
    """The table entries and the item bytes (placed at 64 KiB in the region) for ``m``.

    The order and flags are those ``qemu-img create`` writes.  Raises
    :class:`FormatError` when a value does not fit its field.
    """
    bits = (VHDX_PARAMS_LEAVE_BLOCKS_ALLOCATED if m.leave_blocks_allocated else 0) | (
        VHDX_PARAMS_HAS_PARENT if m.has_parent else 0
    )
    try:
        parts = [
            (VHDX_FILE_PARAMETERS, m.block_size.to_bytes(4, "little") + bits.to_bytes(4, "little")),
            (VHDX_VIRTUAL_DISK_SIZE, m.virtual_disk_size.to_bytes(8, "little")),
            (VHDX_PAGE83, bytes(m.page83).ljust(16, b"\0")[:16]),
            (VHDX_LOGICAL_SECTOR_SIZE, m.logical_sector_size.to_bytes(4, "little")),
            (VHDX_PHYSICAL_SECTOR_SIZE, m.physical_sector_size.to_bytes(4, "little")),
        ]
    except OverflowError as exc:
        raise FormatError(f"cannot build vhdx metadata: {exc}", structure="vhdx metadata") from None
    entries = []
    data = bytearray()
    for gid, raw in parts:
        entries.append(
            MetadataEntry(
                gid,
                VHDX_METADATA_TABLE_SIZE + len(data),
                len(raw),
                is_virtual_disk=gid != VHDX_FILE_PARAMETERS,
                is_required=True,
            )
        )
        data += raw
    return tuple(entries), bytes(data)
