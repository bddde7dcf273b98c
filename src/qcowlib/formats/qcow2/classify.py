"""Reading a source disk cluster by cluster for a qcow2 target, in a worker pool.

Each chunk of consecutive guest clusters is read into a reused buffer and classified
with numpy: all-zero clusters are left out, clusters equal to a backing file's are left
out, zeros over non-zero backing data become zero clusters; with compression every data
cluster is compressed in the same worker.  Chunks come back in guest order.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qcowlib.core.disk import Disk
from qcowlib.core.hostfile import aligned_buffer
from qcowlib.formats.qcow2.compress import compress_cluster

#: Guest bytes read per chunk.
CHUNK = 4 * 1024 * 1024
WORKERS = 2

EMPTY, DATA, ZERO = 0, 1, 2


@dataclass
class Chunk:
    """Classified clusters of one read: a kind per cluster and the bytes to store."""

    first: int
    kinds: npt.NDArray[np.uint8]
    data: memoryview
    #: Compressed payload per cluster (None: store uncompressed).
    compressed: list[bytes | None]
    buffer: memoryview

    @property
    def end(self) -> int:
        return self.first + len(self.kinds)


def cluster_chunks(ranges: list[tuple[int, int]], per_chunk: int) -> Iterator[tuple[int, int]]:
    """``(first, count)`` pieces of cluster ranges, at most ``per_chunk`` clusters each."""
    for first, end in ranges:
        pos = first
        while pos < end:
            n = min(per_chunk, end - pos)
            yield pos, n
            pos += n


class Classifier:
    """Reads and classifies clusters of ``src`` (None: an empty disk) of ``size`` bytes."""

    def __init__(
        self,
        src: Disk | None,
        size: int,
        cluster_size: int,
        *,
        compress: bool = False,
        compression_type: int = 0,
        sparse: bool = True,
        backing: Disk | None = None,
        buffers: int = 5 * WORKERS + 2,
    ) -> None:
        self.src = src
        self.size = size
        self.cs = cluster_size
        self.compress = compress
        self.ctype = compression_type
        self.sparse = sparse
        self.backing = backing
        self.per_chunk = max(1, CHUNK // cluster_size)
        # Buffers are made when first needed (a small disk never needs them all), at
        # most ``buffers`` of them; then reads wait for one to come back.
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        self._unmade = buffers
        self._lock = threading.Lock()
        self._local = threading.local()

    def release(self, chunk: Chunk) -> None:
        """Give a chunk's buffer back once nothing refers to its data any more."""
        self._free.put(chunk.buffer)

    def _buffer(self) -> memoryview:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            make = self._unmade > 0
            if make:
                self._unmade -= 1
        if make:
            return aligned_buffer(self.per_chunk * self.cs)
        return self._free.get()

    def _backing_buffer(self, size: int) -> memoryview:
        """This worker thread's buffer for the backing's bytes (used within one read)."""
        buf: memoryview | None = getattr(self._local, "backing", None)
        if buf is None:
            buf = self._local.backing = aligned_buffer(self.per_chunk * self.cs)
        return buf[:size]

    def _read(self, first: int, n: int) -> Chunk:
        cs = self.cs
        start = first * cs
        length = min(n * cs, self.size - start)
        buf = self._buffer()
        view = memoryview(buf)[: n * cs]
        if self.src is not None and length > 0:
            self.src.read_into(start, view[:length])
        if length < n * cs:
            view[max(0, length) :] = bytes(n * cs - max(0, length))
        arr = np.frombuffer(view, dtype=np.uint64).reshape(n, cs // 8)
        # Most data clusters have a non-zero first word; only the rest are scanned whole.
        if self.sparse:
            nonzero = arr[:, 0] != 0
            rest = np.flatnonzero(~nonzero)
            if rest.size:
                nonzero[rest] = arr[rest].any(axis=1)
        else:
            nonzero = np.ones(n, dtype=bool)
        kinds = np.where(nonzero, DATA, EMPTY).astype(np.uint8)
        if self.backing is not None:
            bbuf = self._backing_buffer(n * cs)
            blen = max(0, min(length, self.backing.virtual_size - start))
            if blen:
                self.backing.read_into(start, bbuf[:blen])
            if blen < n * cs:
                bbuf[blen:] = bytes(n * cs - blen)
            barr = np.frombuffer(bbuf, dtype=np.uint64).reshape(n, cs // 8)
            same = ~(arr != barr).any(axis=1)
            back_nonzero = barr.any(axis=1)
            kinds = np.where(same, EMPTY, np.where(nonzero, DATA, ZERO)).astype(np.uint8)
            kinds[~nonzero & ~back_nonzero] = EMPTY
        compressed: list[bytes | None] = [None] * n
        if self.compress:
            for i in np.flatnonzero(kinds == DATA).tolist():
                payload = compress_cluster(view[i * cs : (i + 1) * cs], self.ctype)
                # QEMU keeps a cluster uncompressed unless compression makes it smaller.
                if len(payload) < cs:
                    compressed[i] = payload
        return Chunk(first, kinds, view, compressed, buf)

    def chunks(self, ranges: list[tuple[int, int]]) -> Iterator[Chunk]:
        """Classified chunks over ``ranges`` in guest order (the caller releases them)."""
        pending: deque[Future[Chunk]] = deque()
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="qcowlib-read") as pool:
            try:
                for first, n in cluster_chunks(ranges, self.per_chunk):
                    pending.append(pool.submit(self._read, first, n))
                    if len(pending) > 2 * WORKERS:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()
                # Wait for reads already running so their buffers are not touched later.
                for f in pending:
                    if not f.cancelled():
                        f.exception()
