"""A base for read-only formats whose QEMU driver reports no allocation.

QEMU's bochs, cloop and dmg drivers have no ``bdrv_co_block_status``: the block layer
then calls every byte of the disk allocated data (``qemu-img map`` prints one entry,
``"data": true, "zero": false``, without an offset) and ``qemu-img info`` shows no
cluster size and no dirty flag.  A reader built on :class:`OpaqueDisk` reports the same
and decodes its own structures in :meth:`Disk._read_layer`, which gets any sub-range.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from qcowlib.core.disk import Disk, Extent, ExtentKind
from qcowlib.core.hostfile import HostFile

__all__ = ["BlockCache", "OpaqueDisk"]


class OpaqueDisk(Disk):
    """One image read through its format's own decoder; no backing file."""

    def __init__(self, host: HostFile, filename: str) -> None:
        self.host = host
        self.filename = filename

    def layer_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        start, end = self._range(offset, length)
        if end > start:
            yield Extent(start, end - start, ExtentKind.DATA)

    def info_tail(self) -> dict[str, Any]:
        return {}

    def _close_layer(self) -> None:
        self.host.close()


class BlockCache:
    """The last decoded blocks of an image, by block number (thread-safe).

    QEMU keeps one decoded block; a few more let a reader's threads work on
    neighbouring blocks without decoding each twice.  Blocks are dropped oldest first
    once they hold more than ``budget`` bytes (the newest is always kept), so memory
    stays bounded by ``budget`` plus the format's block size cap.
    """

    def __init__(self, budget: int = 16 << 20) -> None:
        self._budget = budget
        self._held = 0
        self._blocks: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def get(self, block: int, decode: Callable[[int], bytes]) -> bytes:
        """Block ``block``, decoded with ``decode`` unless held."""
        with self._lock:
            data = self._blocks.get(block)
        if data is not None:
            return data
        data = decode(block)
        with self._lock:
            if block not in self._blocks:
                self._blocks[block] = data
                self._held += len(data)
            while self._held > self._budget and len(self._blocks) > 1:
                self._held -= len(self._blocks.pop(next(iter(self._blocks))))
        return data
