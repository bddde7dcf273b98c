"""QEMU's in-memory refcount table (IMRT) and the bulk counting of references into it.

Every reference that metadata makes to a host cluster is counted here, in QEMU's order
but in batches: an L2 table's references, a table's own clusters, are counted at once
with ``np.bincount``.  Only where each batch came from is remembered, so that in the
rare case of a refcount overflowing its maximum the overflow messages can be placed
exactly where QEMU prints them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from qcowlib.formats.qcow2.checkstate import (
    ENOMEM,
    INT64_MAX,
    MAX_MESSAGES,
    CheckFailed,
    CheckState,
    Result,
    eof_message,
)

if TYPE_CHECKING:
    import numpy.typing as npt

    I64 = npt.NDArray[np.int64]
    Counts = npt.NDArray[Any]
    #: References, the offset of the L2 table they come from, or a way to make them again.
    Source = I64 | int | Callable[[], I64]

#: Above this many references in one pass, overflow messages are not ordered exactly.
EXACT_OVERFLOW_REFS: Final = 1 << 23
_OVERFLOW_HINT: Final = (
    "Use qemu-img amend to increase the refcount entry width or qemu-img convert "
    "to create a clean copy if the image cannot be opened for writing"
)


class Imrt:
    """One refcount per host cluster, as computed from the metadata.  ``size`` is QEMU's
    ``nb_clusters`` (the entries in use); the array may be longer and is zero past it."""

    def __init__(self, size: int, dtype: Any) -> None:
        self.dtype = dtype
        self.size = size
        self.counts: Counts = np.zeros(max(size, 1), dtype=dtype)

    def resize(self, size: int) -> None:
        """realloc_refcount_array: grow to ``size`` entries (new entries are zero)."""
        if size > self.counts.size:
            grown = np.zeros(max(size, self.counts.size * 3 // 2), dtype=self.dtype)
            grown[: self.counts.size] = self.counts
            self.counts = grown
        self.size = max(self.size, size)

    def view(self) -> Counts:
        return self.counts[: self.size]

    def clear(self) -> None:
        self.counts[:] = 0


def ranges(first: I64, count: I64) -> I64:
    """``first[i], first[i] + 1, ..., first[i] + count[i] - 1`` for each i, in order."""
    total = int(count.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(count)
    return np.repeat(first - (ends - count), count) + np.arange(total, dtype=np.int64)


class Recorder:
    """Counts references into an :class:`Imrt` in QEMU's order, in bulk.

    :meth:`flush` saturates the counts at the maximum and emits all messages in QEMU's
    order.  ``rescan`` produces an L2 table's references again, by its offset.
    """

    #: Scattered references are buffered up to this many before counting.
    PENDING_MAX = 1 << 22

    def __init__(
        self, chk: CheckState, res: Result, imrt: Imrt, rescan: Callable[[int], I64]
    ) -> None:
        self.chk = chk
        self.res = res
        self.imrt = imrt
        self.rescan = rescan
        #: (stream position of the first reference, the references themselves, the L2
        #: table offset they come from, or a function that produces them again)
        self.sources: list[tuple[int, Source]] = []
        self.pending: list[tuple[I64, int]] = []
        self.pending_n = 0
        self.n = 0
        self.msgs: list[tuple[int, int, int, str]] = []  # (position, kind, seq, text)
        self.dropped = 0

    @property
    def room(self) -> int:
        """How many more messages are kept."""
        return MAX_MESSAGES - len(self.msgs)

    def msg(self, text: str, pos: int | None = None) -> None:
        if len(self.msgs) >= MAX_MESSAGES:
            self.dropped += 1
            return
        self.msgs.append((self.n if pos is None else pos, 0, len(self.msgs), text))

    def count(self, refs: I64, weight: int = 1) -> None:
        """Add ``weight`` to the IMRT entry of every cluster in ``refs``."""
        if refs.size == 0:
            return
        lo, hi = int(refs.min()), int(refs.max()) + 1
        self.imrt.resize(hi)
        if hi - lo <= 4 * refs.size + 4096:
            counts = np.bincount(refs - lo, minlength=hi - lo) * weight
            self.imrt.counts[lo:hi] += counts.astype(self.imrt.counts.dtype)
        else:
            self.pending.append((refs, weight))
            self.pending_n += int(refs.size)
            if self.pending_n >= self.PENDING_MAX:
                self._drain()

    def add(self, refs: I64, source: int | None = None) -> None:
        """Count ``refs`` as the next references; ``source`` is the L2 table offset
        they were derived from."""
        if refs.size == 0:
            return
        self.sources.append((self.n, refs if source is None else source))
        self.n += int(refs.size)
        self.count(refs)

    def add_stream(self, length: int, replay: Callable[[], I64]) -> None:
        """Account for ``length`` references already counted with :meth:`count`;
        ``replay`` produces them again, in order, should overflows need placing."""
        if length:
            self.sources.append((self.n, replay))
            self.n += length

    def _drain(self) -> None:
        if self.pending:
            refs = np.concatenate([r for r, _w in self.pending])
            weights = np.concatenate([np.full(r.size, w, np.int64) for r, w in self.pending])
            clusters, inverse = np.unique(refs, return_inverse=True)
            counts = np.bincount(inverse, weights=weights, minlength=clusters.size)
            self.imrt.counts[clusters] += np.rint(counts).astype(self.imrt.counts.dtype)
            self.pending.clear()
            self.pending_n = 0

    def inc(self, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt for one range."""
        if size <= 0:
            return
        if offset > INT64_MAX:  # an int64_t offset gone negative: QEMU fails to allocate
            self.res.check_errors += 1
            raise CheckFailed(ENOMEM)
        cs = self.chk.cluster_size
        if offset + size - self.chk.host.size >= cs:
            self.msg(eof_message(offset, size))
            self.res.corruptions += 1
            return
        cb = self.chk.cluster_bits
        first, last = offset >> cb, (offset + size - 1) >> cb
        self.add(np.arange(first, last + 1, dtype=np.int64))

    def inc_clusters(self, offsets: I64) -> None:
        """qcow2_inc_refcounts_imrt for one cluster at each of ``offsets``, in order."""
        if offsets.size == 0:
            return
        cs, cb = self.chk.cluster_size, self.chk.cluster_bits
        eof = offsets + cs - self.chk.host.size >= cs
        spans = ((offsets + cs - 1) >> cb) - (offsets >> cb) + 1
        count = np.where(eof, 0, spans)
        refs = ranges(offsets >> cb, count)
        starts = self.n + np.cumsum(count) - count
        room = self.room
        for i in np.flatnonzero(eof)[:room].tolist():
            self.msg(eof_message(int(offsets[i]), cs), int(starts[i]))
        eofs = int(eof.sum())
        self.dropped += max(0, eofs - room)
        self.res.corruptions += eofs
        self.add(refs)

    def flush(self) -> None:
        """Saturate the counts at the refcount maximum; emit messages in QEMU's order."""
        self._drain()
        rmax = self.chk.refcount_max
        counts = self.imrt.view()
        overflow: list[tuple[int, int, int, str]] = []
        if rmax < np.iinfo(counts.dtype).max:
            over = np.flatnonzero(counts > rmax)
            if over.size:
                self.res.corruptions += int((counts[over] - rmax).sum())
                overflow = self._overflow_messages(over, counts)
                counts[over] = rmax
        for _pos, _kind, _seq, text in sorted(self.msgs + overflow):
            self.chk.messages.add(text)
        self.chk.messages.drop(self.dropped)
        self.sources.clear()
        self.msgs.clear()
        self.dropped = 0

    def _overflow_messages(self, over: I64, counts: Counts) -> list[tuple[int, int, int, str]]:
        """One message pair per reference past the maximum, where QEMU prints it."""
        cs = self.chk.cluster_size
        rmax = self.chk.refcount_max
        out: list[tuple[int, int, int, str]] = []
        limit = 2 * MAX_MESSAGES
        if self.n > EXACT_OVERFLOW_REFS:
            # Too many references to replay: report them after everything else.
            events = 0
            for c in over.tolist():
                excess = int(counts[c]) - rmax
                events += excess
                for _ in range(min(excess, (limit - len(out)) // 2)):
                    out.append((self.n, 1, len(out), f"ERROR: overflow cluster offset={c * cs:#x}"))
                    out.append((self.n, 1, len(out), _OVERFLOW_HINT))
            self.dropped += 2 * events - len(out)
            return out
        pos_sorted, cl_sorted = self._references_to(over)
        rank = np.arange(cl_sorted.size) - np.searchsorted(cl_sorted, cl_sorted, side="left")
        sel = np.flatnonzero(rank >= rmax)
        sel = sel[np.argsort(pos_sorted[sel], kind="stable")]  # events in stream order
        keep_idx = sel[: limit // 2]
        self.dropped += 2 * (sel.size - keep_idx.size)
        for p, c in zip(pos_sorted[keep_idx].tolist(), cl_sorted[keep_idx].tolist(), strict=True):
            out.append((p, 1, len(out), f"ERROR: overflow cluster offset={c * cs:#x}"))
            out.append((p, 1, len(out), _OVERFLOW_HINT))
        return out

    def _references_to(self, over: I64) -> tuple[I64, I64]:
        """Stream positions and clusters of every reference to ``over``, sorted by
        cluster, then position."""
        positions: list[I64] = []
        clusters: list[I64] = []
        for start, source in self.sources:
            if isinstance(source, int):
                refs = self.rescan(source)
            elif callable(source):
                refs = source()
            else:
                refs = source
            hit = np.flatnonzero(np.isin(refs, over))
            if hit.size:
                positions.append(hit.astype(np.int64) + start)
                clusters.append(refs[hit])
        pos_all = np.concatenate(positions)
        cl_all = np.concatenate(clusters)
        order = np.lexsort((pos_all, cl_all))
        return pos_all[order], cl_all[order]
