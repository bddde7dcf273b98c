"""Where a new qcow2 image's data goes: one placement rule for files and streams.

The qcow2 output layout (:mod:`qcowlib.formats.qcow2.output`) lays out the data area
chunk by chunk with :class:`DataPlacer` and turns a classified chunk into its pieces in
file order with :func:`chunk_records`, for files and streams alike.

Within a chunk the compressed clusters come first, packed back to back in guest order,
then the clusters stored whole, back to back from the next cluster boundary.  Packing
only within a chunk's run of compressed clusters would leave the rest of a cluster
unused wherever compressed and whole clusters alternate (up to a cluster each time:
a third of a mixed disk's ``-c`` output here); per chunk it leaves at most one
partial cluster per chunk, and each chunk's data still lies after the previous one's,
so a stream emits it in file order with one chunk in memory.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from qcowlib.core.plan import DATA, Chunk
from qcowlib.errors import QcowlibIOError
from qcowlib.formats.qcow2 import refcount as rc
from qcowlib.formats.qcow2 import tables

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]


class DataPlacer:
    """Host offsets for data from ``start`` on, and the refcounts they add."""

    def __init__(self, cluster_size: int, refcount_order: int, start: int, clusters: int) -> None:
        self.cs = cluster_size
        self.max_ref = rc.max_refcount(refcount_order)
        self.pos = start
        #: Refcount per host cluster (from cluster 0; the caller sets metadata's).
        self.counts = np.zeros(max(clusters, start // cluster_size + 2), dtype=np.uint64)

    def _grow(self, cluster_end: int) -> None:
        if cluster_end > self.counts.size:
            grown = np.zeros(max(cluster_end, self.counts.size * 2), dtype=np.uint64)
            grown[: self.counts.size] = self.counts
            self.counts = grown

    def plain(self, n: int) -> int:
        """Room for ``n`` whole clusters from the next cluster boundary; their start."""
        cs = self.cs
        start = -(-self.pos // cs) * cs
        self._grow(start // cs + n + 1)
        self.counts[start // cs : start // cs + n] = 1
        self.pos = start + n * cs
        return start

    def packed(self, lengths: I64) -> U64:
        """Offsets for compressed payloads of ``lengths`` bytes, packed back to back.

        A payload that would share a cluster whose refcount is already at its maximum
        starts on the next cluster instead (QEMU's rule); that only happens with narrow
        refcounts, and is then worked out payload by payload.
        """
        n = int(lengths.size)
        if n == 0:
            return np.zeros(0, dtype=np.uint64)
        cs = self.cs
        ends = self.pos + np.cumsum(lengths)
        offs = ends - lengths
        first = offs // cs
        last = (ends - 1) // cs
        base = int(first[0])
        self._grow(int(last[-1]) + 2)
        # Each payload adds one reference to every cluster it touches.
        diff = np.zeros(int(last[-1]) - base + 2, dtype=np.int64)
        np.add.at(diff, first - base, 1)
        np.add.at(diff, last - base + 1, -1)
        added = np.cumsum(diff[:-1]).astype(np.uint64)
        window = self.counts[base : base + added.size]
        new = window + added
        if np.any(new > np.uint64(self.max_ref)):
            return self._packed_one_by_one(lengths)
        window[:] = new
        self.pos = int(ends[-1])
        return offs.astype(np.uint64)

    def _packed_one_by_one(self, lengths: I64) -> U64:
        cs = self.cs
        out = np.zeros(lengths.size, dtype=np.uint64)
        pos = self.pos
        for k, length in enumerate(lengths.tolist()):
            c = pos // cs
            if pos % cs and int(self.counts[c]) >= self.max_ref:
                pos = (c + 1) * cs  # the shared cluster's refcount is full
            end_cluster = (pos + length - 1) // cs
            self._grow(end_cluster + 2)
            self.counts[pos // cs : end_cluster + 1] += np.uint64(1)
            out[k] = pos
            pos += length
        self.pos = pos
        return out

    def place_chunk(self, clen: I64) -> U64:
        """Host offsets for a chunk's data clusters in guest order: ``clen[i]`` bytes
        of compressed payload, or 0 for a cluster stored whole.  Compressed ones are
        packed first, then the whole ones follow from a cluster boundary."""
        host = np.zeros(clen.size, dtype=np.uint64)
        comp = clen > 0
        if comp.any():
            host[comp] = self.packed(clen[comp])
        n_plain = int(clen.size - np.count_nonzero(comp))
        if n_plain:
            start = self.plain(n_plain)
            host[~comp] = np.uint64(start) + np.arange(n_plain, dtype=np.uint64) * np.uint64(
                self.cs
            )
        return host

    def refcounts(self, metadata_end: int) -> U64:
        """Refcounts of the whole file: metadata clusters up to ``metadata_end`` and
        every data cluster placed."""
        cs = self.cs
        end = max(self.pos, metadata_end)
        counts = np.zeros(-(-end // cs), dtype=np.uint64)
        used = min(counts.size, self.counts.size)
        counts[:used] = self.counts[:used]
        counts[: metadata_end // cs] = 1
        if np.any(counts > np.uint64(self.max_ref)):
            raise QcowlibIOError("internal: refcount overflow")
        return counts


def chunk_payload_lengths(chunk: Chunk, local: I64) -> I64:
    """Per data cluster ``local`` of ``chunk``: its compressed length, 0 if stored whole."""
    payloads = chunk.compressed
    return np.fromiter(
        (0 if (p := payloads[i]) is None else len(p) for i in local.tolist()),
        dtype=np.int64,
        count=int(local.size),
    )


def l2_entries(host: U64, clen: I64, cluster_bits: int) -> U64:
    """L2 entries for data at ``host`` (compressed where ``clen`` > 0)."""
    entries = host | np.uint64(tables.OFLAG_COPIED)
    comp = clen > 0
    if comp.any():
        layout = tables.CompressedLayout(cluster_bits)
        entries[comp] = layout.encode(host[comp], clen[comp].astype(np.uint64))
    return entries


def chunk_records(
    chunk: Chunk, local: I64, host: U64, clen: I64, cs: int
) -> list[tuple[int, bytes | memoryview]]:
    """A chunk's stored data as ``(file offset, bytes)`` in file order: compressed
    payloads, then runs of whole clusters (slices of the chunk's buffer, zero padded
    past the disk's end as the image's last cluster is)."""
    out: list[tuple[int, bytes | memoryview]] = []
    comp = clen > 0
    if comp.any():
        payloads = chunk.compressed
        for i, off in zip(local[comp].tolist(), host[comp].tolist(), strict=True):
            payload = payloads[i]
            assert payload is not None
            out.append((off, payload))
    plain = np.flatnonzero(~comp)
    if plain.size:
        idx = local[plain]
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        heads = np.concatenate(([0], breaks))
        tails = np.append(breaks, idx.size)
        for a, b, off in zip(
            idx[heads].tolist(), (idx[tails - 1] + 1).tolist(), host[plain][heads].tolist(),
            strict=True,
        ):  # fmt: skip
            out.append((off, chunk.data[a * cs : b * cs]))
    return out


def data_clusters(chunk: Chunk) -> I64:
    """Indexes (within the chunk) of the clusters that hold data."""
    return np.flatnonzero(chunk.kinds == DATA).astype(np.int64)
