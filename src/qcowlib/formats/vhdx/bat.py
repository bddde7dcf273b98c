"""VHDX block allocation table (MS-VHDX 2.5): sizes, decoding and checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from qcowlib.errors import CorruptImage, QcowlibError, TruncatedImage
from qcowlib.formats.vhdx.header import RegionEntry
from qcowlib.formats.vhdx.spec import (
    _BAT_OFFSET_SHIFT,
    _PAYLOAD_STATES,
    _U64LE,
    BAT_STATE_MASK,
    PAYLOAD_BLOCK_FULLY_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT,
    SB_BLOCK_PRESENT,
    VHDX_HEADER_SECTION_END,
    VHDX_MAX_SECTORS_PER_BLOCK,
    VHDX_REGION_TABLE_OFFSETS,
)

if TYPE_CHECKING:
    # numpy is imported where the BAT is decoded, so that header work stays light.
    import numpy as np
    import numpy.typing as npt

    from qcowlib.formats.vhdx.metadata import Metadata

    BatArray = npt.NDArray[np.uint64]


# ---------------------------------------------------------------------------------------
# block allocation table (spec 2.5)


def chunk_ratio(block_size: int, logical_sector_size: int) -> int:
    """Payload blocks per sector bitmap block: 2**23 sectors over sectors per block."""
    return VHDX_MAX_SECTORS_PER_BLOCK * logical_sector_size // block_size


def bat_entries(virtual_size: int, block_size: int, ratio: int, *, has_parent: bool) -> int:
    """The number of BAT entries (spec 2.5; QEMU ``vhdx_calc_bat_entries``).

    A non-differencing disk has no sector bitmap entry after its last chunk.
    """
    blocks = -(-virtual_size // block_size)
    bitmaps = -(-blocks // ratio)
    if has_parent:
        return bitmaps * (ratio + 1)
    if blocks == 0:
        return 0
    return blocks + (blocks - 1) // ratio


def bat_size(m: Metadata, region: RegionEntry) -> int:
    """The BAT entries of a disk without parent, checked to fit the BAT ``region``.

    Raises :class:`TruncatedImage` when the region is too small for them.
    """
    entries = bat_entries(m.virtual_disk_size, m.block_size, m.chunk_ratio, has_parent=False)
    if entries * 8 > region.length:
        raise TruncatedImage(
            f"VHDX BAT region of {region.length} bytes is too small for {entries} entries",
            structure="vhdx region table",
            field="bat.length",
            offset=VHDX_REGION_TABLE_OFFSETS[0],
        )
    return entries


def payload_bat_index(first: int, stop: int, ratio: int) -> npt.NDArray[np.int64]:
    """BAT indexes of payload blocks ``first`` to ``stop - 1``."""
    import numpy as np

    blocks = np.arange(first, stop, dtype=np.int64)
    return blocks + blocks // ratio


def decode_bat(raw: bytes, entries: int, offset: int = 0) -> BatArray:
    """The BAT as native ``uint64`` entries.

    Raises :class:`TruncatedImage` when ``raw`` holds fewer than ``entries`` entries.
    """
    import numpy as np

    if entries < 0 or len(raw) < entries * 8:
        raise TruncatedImage(
            f"VHDX BAT is truncated ({len(raw)} of {entries * 8} bytes)",
            structure="vhdx bat",
            offset=offset,
        )
    return np.frombuffer(raw, dtype=np.dtype(_U64LE), count=entries).astype(np.uint64)


def encode_bat(bat: BatArray) -> bytes:
    """The on-disk bytes of a BAT (little-endian)."""
    import numpy as np

    return np.asarray(bat, dtype=np.uint64).astype(np.dtype(_U64LE)).tobytes()


def bat_states(bat: BatArray) -> npt.NDArray[np.uint8]:
    """The state (bits 0-2) of each entry."""
    import numpy as np

    return (bat & np.uint64(BAT_STATE_MASK)).astype(np.uint8)


def bat_offsets(bat: BatArray) -> npt.NDArray[np.uint64]:
    """The file offset (bits 20-63, in MiB) of each entry, in bytes."""
    import numpy as np

    return (bat >> np.uint64(_BAT_OFFSET_SHIFT)) << np.uint64(_BAT_OFFSET_SHIFT)


def check_bat(
    bat: BatArray,
    m: Metadata,
    file_size: int,
    bat_offset: int = 0,
    regions: Sequence[tuple[int, int]] = (),
) -> npt.NDArray[np.uint64]:
    """Check the payload entries of a non-differencing disk; returns them.

    Raises :class:`CorruptImage` for an unknown state, a partially present block (only
    differencing disks have them), a present block inside the header section or whose
    whole block meets one of ``regions`` (``(start, end)`` of the log and the region
    table's entries: QEMU's ``vhdx_check_bat_entries`` refuses the image on open), and
    :class:`TruncatedImage` for a present block whose guest-visible part ends past the
    end of the file (QEMU: "VHDX BAT data block offset past EOF"; an offset so large
    that the block's end passes 2**64 is past it too, not wrapped around).
    """
    import numpy as np

    ratio = m.chunk_ratio
    n_blocks = -(-m.virtual_disk_size // m.block_size)
    idx = payload_bat_index(0, n_blocks, ratio)
    if idx.size and int(idx[-1]) >= bat.size:
        raise TruncatedImage(
            "VHDX BAT is too short for the disk size", structure="vhdx bat", offset=bat_offset
        )
    payload = bat[idx]
    states = bat_states(payload)
    bad = np.flatnonzero(~np.isin(states, _PAYLOAD_STATES) | (states == 7))
    if bad.size:
        i = int(bad[0])
        raise CorruptImage(
            f"VHDX payload block {i} has state {int(states[i])}, invalid in a disk without parent",
            structure="vhdx bat",
            field=f"entry[{int(idx[i])}]",
            offset=bat_offset + 8 * int(idx[i]),
        )
    present = states == PAYLOAD_BLOCK_FULLY_PRESENT
    offsets = bat_offsets(payload)
    for mask, error, text in _placement_checks(present, offsets, m, file_size, regions):
        hit = np.flatnonzero(mask)
        if hit.size:
            i = int(hit[0])
            raise error(
                f"VHDX payload block {i} at {int(offsets[i]):#x} {text}",
                structure="vhdx bat",
                field=f"entry[{int(idx[i])}]",
                offset=bat_offset + 8 * int(idx[i]),
            )
    return payload


def _placement_checks(
    present: npt.NDArray[np.bool_],
    offsets: npt.NDArray[np.uint64],
    m: Metadata,
    file_size: int,
    regions: Sequence[tuple[int, int]],
) -> list[tuple[npt.NDArray[np.bool_], type[QcowlibError], str]]:
    """Masks of the present blocks that lie where no payload block may: in the header
    section, past the end of the file, on the log or a region."""
    import numpy as np

    n_blocks = offsets.size
    lengths = np.full(n_blocks, m.block_size, dtype=np.uint64)
    if n_blocks:
        lengths[-1] = m.virtual_disk_size - (n_blocks - 1) * m.block_size
    end = np.uint64(file_size)
    low = present & (offsets < np.uint64(VHDX_HEADER_SECTION_END))
    # Without wrapping: offset + length > file_size, for offsets up to 2**64 - 1 MiB.
    past = present & ((offsets > end) | (lengths > end - np.minimum(offsets, end)))
    checks: list[tuple[npt.NDArray[np.bool_], type[QcowlibError], str]] = [
        (low, CorruptImage, "lies inside the VHDX header section"),
        (past, TruncatedImage, "lies past the end of the file"),
    ]
    block = np.uint64(m.block_size)
    for start, stop in regions:  # a block meeting one lies inside the file: no wrapping
        meets = present & ~past & (offsets < np.uint64(stop)) & (offsets + block > np.uint64(start))
        checks.append((meets, CorruptImage, f"overlaps the region {start:#x}-{stop:#x}"))
    return checks


def check_differencing_bat(
    bat: BatArray, m: Metadata, file_size: int, bat_offset: int = 0
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """Check the BAT of a differencing disk; returns its payload entries and, per payload
    block, the file offset of its sector bitmap bits (-1 where the block needs none).

    Payload states may be any of spec 2.5.1's (not present, undefined, zero, unmapped,
    fully or partially present); a present block must lie after the header section and
    inside the file; a partially present block needs its chunk's sector bitmap block
    present and inside the file.  Raises :class:`CorruptImage` or
    :class:`TruncatedImage` naming the entry.
    """
    import numpy as np

    ratio = m.chunk_ratio
    n_blocks = -(-m.virtual_disk_size // m.block_size)
    idx = payload_bat_index(0, n_blocks, ratio)
    sb_idx = (np.arange(n_blocks, dtype=np.int64) // ratio) * (ratio + 1) + ratio
    if n_blocks and int(sb_idx[-1]) >= bat.size:
        raise TruncatedImage(
            "VHDX BAT is too short for the disk size", structure="vhdx bat", offset=bat_offset
        )
    payload = bat[idx]
    states = bat_states(payload)
    known = np.isin(
        states, (0, 1, 2, 3, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_PARTIALLY_PRESENT)
    )
    present = (states == PAYLOAD_BLOCK_FULLY_PRESENT) | (states == PAYLOAD_BLOCK_PARTIALLY_PRESENT)
    offsets = bat_offsets(payload)
    sb = bat[sb_idx]
    sb_offsets = bat_offsets(sb).astype(np.int64)
    partial = states == PAYLOAD_BLOCK_PARTIALLY_PRESENT
    sb_bad = partial & (
        (bat_states(sb) != SB_BLOCK_PRESENT)
        | (sb_offsets < VHDX_HEADER_SECTION_END)
        | (sb_offsets + (1 << 20) > file_size)
    )
    checks = (
        (~known, CorruptImage, "has an unknown state"),
        (
            present & (offsets < np.uint64(VHDX_HEADER_SECTION_END)),
            CorruptImage,
            "lies inside the VHDX header section",
        ),
        (
            present & (offsets + np.uint64(m.block_size) > np.uint64(file_size)),
            TruncatedImage,
            "lies past the end of the file",
        ),
        (sb_bad, CorruptImage, "is partially present but its sector bitmap block is not"),
    )
    _raise_first(checks, idx, bat_offset)
    sectors = m.block_size // m.logical_sector_size
    bits_at = sb_offsets + (np.arange(n_blocks, dtype=np.int64) % ratio) * (sectors // 8)
    return payload, np.where(partial, bits_at, -1)


def _raise_first(
    checks: tuple[tuple[npt.NDArray[np.bool_], type[QcowlibError], str], ...],
    idx: npt.NDArray[np.int64],
    bat_offset: int,
) -> None:
    """Raise the first check's error at the first payload block it fails for."""
    import numpy as np

    for mask, error, text in checks:
        hit = np.flatnonzero(mask)
        if hit.size:
            i = int(hit[0])
            raise error(
                f"VHDX payload block {i} {text}",
                structure="vhdx bat",
                field=f"entry[{int(idx[i])}]",
                offset=bat_offset + 8 * int(idx[i]),
            )
