"""In-place writes for ``check -r``: the few primitives a qcow2 repair needs.

Repairs change metadata only (refcount blocks and table, L1/L2 entry flag bits, the
refcount table pointer and feature bits in the header), never guest data.  The writer
works on an already open :class:`~qcowlib.disk._file.HostFile` (opened with
``writable=True``) and keeps its ``size`` current when a write or ``grow`` extends it.
"""

from __future__ import annotations

import os
import struct

from qcowlib.disk._file import HostFile, punch_hole
from qcowlib.errors import InvalidArgument, QcowlibIOError

#: Byte offsets of header fields a repair rewrites (qcow2.txt "Header").
HEADER_REFCOUNT_TABLE_OFFSET = 48  # refcount_table_offset (8) + refcount_table_clusters (4)
HEADER_INCOMPATIBLE_FEATURES = 72


class ResizeFailed(QcowlibIOError):
    """The file could not be extended; ``reason`` is the system's error text."""

    def __init__(self, reason: str, *, file: str) -> None:
        super().__init__(f"Could not resize file: {reason}", file=file)
        self.reason = reason


class RepairWriter:
    """Positional writes into a qcow2 file opened read-write for repair."""

    def __init__(self, host: HostFile) -> None:
        self.host = host

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``; raises :class:`QcowlibIOError` on failure."""
        if offset < 0:
            raise InvalidArgument(f"negative write offset {offset}", file=self.host.path)
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                n = os.pwrite(self.host.fd, view[done:], offset + done)
                if n <= 0:  # pragma: no cover - pwrite on a regular file
                    raise OSError(0, "short write")
                done += n
        except OSError as exc:
            raise QcowlibIOError(
                f"write error at {offset:#x}: {exc.strerror}", file=self.host.path, offset=offset
            ) from None
        self.host.size = max(self.host.size, offset + len(view))

    def grow(self, size: int) -> None:
        """Extend the file to ``size`` bytes (a hole); never shrinks it.

        Raises :class:`ResizeFailed` when the file system refuses.
        """
        if size <= self.host.size:
            return
        try:
            os.ftruncate(self.host.fd, size)
        except (OSError, OverflowError) as exc:
            reason = getattr(exc, "strerror", None) or "File too large"
            raise ResizeFailed(reason, file=self.host.path) from None
        self.host.size = size

    def discard(self, offset: int, length: int) -> None:
        """Deallocate freed clusters inside the file (best effort, as QEMU's discard)."""
        length = min(length, self.host.size - offset)
        if offset >= 0 and length > 0:
            punch_hole(self.host.fd, offset, length)

    def write_refcount_table_pointer(self, offset: int, clusters: int) -> None:
        """Point the header at a new refcount table (``refcount_table_offset/_clusters``)."""
        self.pwrite(HEADER_REFCOUNT_TABLE_OFFSET, struct.pack(">QI", offset, clusters))

    def write_incompatible_features(self, features: int) -> None:
        """Rewrite the v3 header's ``incompatible_features`` (dirty and corrupt bits)."""
        self.pwrite(HEADER_INCOMPATIBLE_FEATURES, struct.pack(">Q", features))

    def sync(self) -> None:
        """Flush written data to stable storage."""
        try:
            os.fsync(self.host.fd)
        except OSError as exc:
            raise QcowlibIOError(f"cannot flush: {exc.strerror}", file=self.host.path) from None
