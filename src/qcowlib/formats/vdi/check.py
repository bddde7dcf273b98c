"""``qemu-img check`` for VDI images: the block map and the header's block count.

As QEMU's ``vdi_co_check``: every allocated block map entry must name a block below
``blocks_in_image`` and no block may be named twice; the number of allocated entries must
equal the header's ``blocks_allocated``.  Each problem is one corruption and one stderr
line in QEMU's words (including its quirk of naming the shared block twice in "also used
by").  Repair is not supported, as in QEMU (``qemu-img check -r`` exits 63).  The image is
opened as QEMU opens it for a check: the header must be sound, the block map is judged
here instead of refused.
"""

from __future__ import annotations

from collections.abc import Callable

from qcowlib.checkreport import CheckNotSupported, CheckReport
from qcowlib.core.hostfile import HostFile
from qcowlib.formats.vdi import codec as vdi
from qcowlib.formats.vdi.reader import read_header

#: stderr lines kept (the counts cover every problem).
MAX_MESSAGES = 1 << 16


def check_file(host: HostFile, path: str, fix: int, _open: Callable[..., object]) -> CheckReport:
    """Check the VDI image open as ``host``; ``fix`` (repair) is refused as QEMU does."""
    import numpy as np

    if fix:
        raise CheckNotSupported("vdi images cannot be repaired", file=path)
    h = read_header(host)
    n = h.blocks_in_image
    at, length = vdi.block_map_extent(h)
    raw = host.pread_exact(at, length, "block map") if length else b""
    bmap = np.frombuffer(raw, dtype=np.dtype("<u4"), count=n).astype(np.int64)
    allocated = bmap < vdi.VDI_DISCARDED
    too_large = np.flatnonzero(allocated & (bmap >= n))
    valid = np.flatnonzero(allocated & (bmap < n))
    # Entries naming a block an earlier entry already named (the first one keeps it).
    _, first = np.unique(bmap[valid], return_index=True)
    repeated = np.setdiff1d(valid, valid[first], assume_unique=True)
    events = sorted(
        [(int(b), f"ERROR: block index {b} too large, is {int(bmap[b])}") for b in too_large]
        + [
            (int(b), f"ERROR: block index {int(bmap[b])} also used by {int(bmap[b])}")
            for b in repeated
        ]
    )
    messages = [text for _, text in events[:MAX_MESSAGES]]
    corruptions = len(events)
    counted = int(valid.size)
    if counted != h.blocks_allocated:
        messages.append(
            f"ERROR: allocated blocks mismatch, is {counted}, should be {h.blocks_allocated}"
        )
        corruptions += 1
    return CheckReport(path, "vdi", corruptions=corruptions, messages=tuple(messages))
