"""VHD block allocation table and sector bitmaps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qcowlib.errors import (
    TruncatedImage,
)
from qcowlib.formats.vhd.dynamic import bitmap_size
from qcowlib.formats.vhd.footer import BAT_UNALLOCATED, SECTOR

if TYPE_CHECKING:
    # numpy is imported where tables are decoded, so that header work stays light.
    import numpy as np
    import numpy.typing as npt

    BatArray = npt.NDArray[np.uint32]


# ---------------------------------------------------------------------------------------
# block allocation table and sector bitmaps


def decode_bat(raw: bytes, entries: int) -> BatArray:
    """The BAT as native ``uint32`` sector numbers (:data:`BAT_UNALLOCATED`: none).

    Raises :class:`TruncatedImage` when ``raw`` holds fewer than ``entries`` entries.
    """
    import numpy as np

    if len(raw) < entries * 4:
        raise TruncatedImage(
            f"VHD block allocation table is truncated ({len(raw)} of {entries * 4} bytes)",
            structure="vhd bat",
        )
    return np.frombuffer(raw, dtype=np.dtype(">u4"), count=entries).astype(np.uint32)


def encode_bat(bat: BatArray) -> bytes:
    """The on-disk bytes of a BAT (big-endian), padded to whole sectors with 0xFF."""
    import numpy as np

    raw = np.asarray(bat, dtype=np.uint32).astype(np.dtype(">u4")).tobytes()
    pad = -len(raw) % SECTOR
    return raw + b"\xff" * pad


def check_bat(bat: BatArray, block_size: int, file_size: int, table_offset: int) -> None:
    """Refuse BAT entries whose block (bitmap and data) ends past the end of the file.

    QEMU: "free_data_block_offset points after the end of file".  Raises
    :class:`TruncatedImage` naming the first such entry and where it is in the file.
    """
    import numpy as np

    allocated = bat != BAT_UNALLOCATED
    ends = bat.astype(np.uint64) * np.uint64(SECTOR) + np.uint64(
        bitmap_size(block_size) + block_size
    )
    bad = np.flatnonzero(allocated & (ends > np.uint64(file_size)))
    if bad.size:
        i = int(bad[0])
        raise TruncatedImage(
            f"VHD block {i} at {int(bat[i]) * SECTOR:#x} lies past the end of the file",
            structure="vhd bat",
            field=f"entry[{i}]",
            offset=table_offset + 4 * i,
        )


def bitmap_runs(raw: bytes, sectors: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Runs of equal bits in the first ``sectors`` bits of a sector bitmap.

    Returns ``(starts, is_set)``: run ``i`` covers sectors ``starts[i]`` to
    ``starts[i + 1]`` (or ``sectors``).  Bits are most significant first.
    """
    import numpy as np

    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=sectors).astype(np.bool_)
    if sectors == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.bool_)
    change = np.flatnonzero(bits[1:] != bits[:-1]) + 1
    starts = np.concatenate(([0], change)).astype(np.int64)
    return starts, bits[starts]
