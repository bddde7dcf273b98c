"""``check`` of a QED image, as ``qemu-img check`` does it (QEMU 7.2 ``block/qed-check.c``).

Every cluster the tables reference is marked in a bitmap of the file's clusters: the L1
table, each L2 table (an L1 entry that is not a valid table offset is a corruption, a
table whose clusters are already in use is a corruption and is not descended into) and
each data cluster (an L2 entry that is not a valid cluster offset is a corruption, a
cluster referenced twice is a corruption).  When every table could be read, clusters
past the header that nothing references are leaks.  ``allocated-clusters`` counts the
L2 entries that are neither unallocated nor zero, ``fragmented-clusters`` those that do
not follow the previous one of their table, ``total-clusters`` the clusters of the
guest disk.

Repair (``-r``, any mode) clears the invalid entries (writing the whole table back, as
QEMU does) and, when nothing is left to repair, clears ``QED_F_NEED_CHECK``; leaks are
not repaired (QEMU cannot either).  A repair that fixed something is followed by a
second, read-only pass, whose counts are reported with the fixed ones.

QEMU's cluster numbering (``qed_bytes_to_clusters``) divides by ``cluster_size - 1``;
it is kept, since it decides which clusters count as leaked in large files.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from qcowlib.checkreport import CheckReport
from qcowlib.formats.qed import codec as qed
from qcowlib.formats.qed.reader import read_header

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from qcowlib.core.disk import Disk
    from qcowlib.core.hostfile import HostFile
    from qcowlib.formats.qed.codec import U64

__all__ = ["check_file"]

#: Clusters (of the file) the check keeps a bitmap of at most: 2**32 clusters is 16
#: TiB of 4 KiB clusters, far past any file qemu writes.
MAX_CHECK_CLUSTERS = 1 << 32


@dataclass
class _Counts:
    corruptions: int = 0
    corruptions_fixed: int = 0
    check_errors: int = 0
    leaks: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0


def bytes_to_clusters(h: qed.QedHeader, nbytes: int) -> int:
    """QEMU's ``qed_bytes_to_clusters`` (rounds up, then divides by cluster_size - 1)."""
    cs = h.cluster_size
    return ((nbytes + cs - 1) & ~(cs - 1)) // (cs - 1)


class _Check:
    """One pass of ``qed_check``."""

    def __init__(self, host: HostFile, h: qed.QedHeader, fix: bool) -> None:
        import numpy as np

        self.host = host
        self.h = h
        self.fix = fix
        self.res = _Counts()
        self.nclusters = bytes_to_clusters(h, h.file_size)
        # Slack past nclusters: a table's clusters may run past the last whole one.
        self.used = np.zeros(self.nclusters + h.table_size + 2, dtype=np.bool_)

    def set_used(self, idx: npt.NDArray[np.int64]) -> bool:
        """qed_set_used_clusters for a list of cluster numbers; False on a collision."""
        import numpy as np

        if idx.size == 0:
            return True
        uniq, counts = np.unique(idx, return_counts=True)
        seen = self.used[uniq]
        dup = int(counts[seen].sum()) + int((counts[~seen] - 1).sum())
        self.used[uniq] = True
        self.res.corruptions += dup
        return dup == 0

    def _table_clusters(self, offset: int, n: int) -> npt.NDArray[np.int64]:
        import numpy as np

        first = bytes_to_clusters(self.h, offset)
        return np.arange(first, first + n, dtype=np.int64)

    def run(self, l1: U64) -> None:
        import numpy as np

        h = self.h
        self.res.total_clusters = -(-h.image_size // h.cluster_size)
        self.set_used(self._table_clusters(h.l1_table_offset, h.table_size))
        invalid_l1: list[int] = []
        for i in np.flatnonzero(l1).tolist():
            offset = int(l1[i])
            if not qed.check_table_offset(h, offset):
                self._invalid(invalid_l1, i)
                continue
            if not self.set_used(self._table_clusters(offset, h.table_size)):
                continue  # an invalid table is skipped
            raw = self.host.pread(offset, h.table_bytes)
            l2 = qed.decode_table(raw, h, offset).copy()
            bad = self._check_l2(l2)
            if bad and self.fix:
                self.host.pwrite(offset, l2.astype(np.dtype("<u8")).tobytes())
        if invalid_l1 and self.fix:
            l1 = l1.copy()
            l1[invalid_l1] = 0
            self.host.pwrite(h.l1_table_offset, l1.astype(np.dtype("<u8")).tobytes())
        self._leaks()

    def _invalid(self, invalid: list[int], i: int) -> None:
        if self.fix:
            self.res.corruptions_fixed += 1
        else:
            self.res.corruptions += 1
        invalid.append(i)

    def _check_l2(self, l2: U64) -> int:
        """qed_check_l2_table; clears invalid entries of ``l2`` when fixing."""
        import numpy as np

        h = self.h
        res = self.res
        alloc = np.flatnonzero(l2 > qed.QED_ZERO_CLUSTER)
        offsets = l2[alloc]
        res.allocated_clusters += int(alloc.size)
        if alloc.size > 1:
            follows = offsets[1:] == offsets[:-1] + np.uint64(h.cluster_size)
            res.fragmented_clusters += int(np.count_nonzero(~follows))
        valid = qed.valid_cluster_offsets(h, offsets)
        n_bad = int(np.count_nonzero(~valid))
        if self.fix:
            res.corruptions_fixed += n_bad
            l2[alloc[~valid]] = 0
        else:
            res.corruptions += n_bad
        good = offsets[valid]
        cs = h.cluster_size
        idx = ((good + np.uint64(cs - 1)) & ~np.uint64(cs - 1)) // np.uint64(cs - 1)
        self.set_used(idx.astype(np.int64))
        return n_bad

    def _leaks(self) -> None:
        import numpy as np

        lo = min(self.h.header_size, self.nclusters)
        self.res.leaks = int(np.count_nonzero(~self.used[lo : self.nclusters]))


def _mark_clean(host: HostFile, h: qed.QedHeader, res: _Counts) -> None:
    """qed_check_mark_clean: clear QED_F_NEED_CHECK once nothing is left to repair."""
    if res.corruptions or res.check_errors or not h.need_check:
        return
    host.sync()
    features = h.features & ~qed.QED_F_NEED_CHECK
    host.pwrite(16, struct.pack("<Q", features))
    host.sync()


def _pass(host: HostFile, fix: bool) -> _Counts:
    from qcowlib.errors import QcowlibError

    h, _ = read_header(host)
    if bytes_to_clusters(h, h.file_size) > MAX_CHECK_CLUSTERS:
        raise QcowlibError(
            f"QED file has too many clusters to check (at most {MAX_CHECK_CLUSTERS})",
            file=host.path,
        )
    raw = host.pread_exact(h.l1_table_offset, h.table_bytes, "qed l1 table")
    chk = _Check(host, h, fix)
    chk.run(qed.decode_table(raw, h, h.l1_table_offset))
    if fix:
        _mark_clean(host, h, chk.res)
    return chk.res


def check_file(
    host: HostFile, path: str, fix: int, open_backing: Callable[[str, str | None], Disk]
) -> CheckReport:
    """The registry's QED checker (``fix``: 0, or BDRV_FIX_* bits, with ``host``
    writable).  Opens the backing file as qemu-img does, so a missing one fails the
    same way."""
    h, name = read_header(host)
    if name is not None:
        _open_backing(path, name, "raw" if h.backing_is_raw else None, open_backing)
    res = _pass(host, bool(fix))
    repaired = bool(res.corruptions_fixed)
    if repaired:
        fixed = res.corruptions_fixed
        res = replace(_pass(host, False), corruptions_fixed=fixed)
    return CheckReport(
        filename=path,
        format="qed",
        check_errors=res.check_errors,
        corruptions=res.corruptions,
        leaks=res.leaks,
        corruptions_fixed=res.corruptions_fixed,
        total_clusters=res.total_clusters,
        allocated_clusters=res.allocated_clusters,
        fragmented_clusters=res.fragmented_clusters,
        repaired=repaired,
    )


def _open_backing(
    path: str, name: str, fmt: str | None, open_backing: Callable[[str, str | None], Disk]
) -> None:
    from qcowlib.core.chain import BackingPolicy, resolve_linked_path
    from qcowlib.errors import BackingNotFound, QcowlibIOError

    full = resolve_linked_path(path, name, "backing file", BackingPolicy())
    try:
        open_backing(full, fmt).close()
    except QcowlibIOError as exc:
        raise BackingNotFound(
            f"cannot open backing file {full!r}: {exc.message}", file=path
        ) from None
