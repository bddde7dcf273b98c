"""Raw images: the file is the disk."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Self

from qcowlib.core.disk import Disk, Extent, ExtentKind
from qcowlib.core.hostfile import HostFile, pwrite_all, size_of
from qcowlib.errors import QcowlibIOError

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy


class RawDisk(Disk):
    """A raw image; holes in the file are reported as zero extents (as qemu-img map)."""

    format = "raw"

    def __init__(self, host: HostFile, filename: str) -> None:
        self.host = host
        self.filename = filename
        # The block layer counts whole 512-byte sectors: a partial last sector reads as
        # if padded with zeros (as qemu-img shows it).
        self.virtual_size = -(-host.size // 512) * 512

    @property
    def file_is_disk(self) -> bool:
        return self.backing is None and self.host.size == self.virtual_size

    def layer_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        start, end = self._range(offset, length)
        for s, e, is_data in self.host.segments(start, end):
            kind = ExtentKind.DATA if is_data else ExtentKind.ZERO
            yield Extent(s, e - s, kind, host_offset=s, file=self.filename)

    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        assert ext.host_offset is not None
        self.host.pread_into(ext.host_offset, buf)

    def read_into(self, offset: int, buf: memoryview | bytearray) -> None:
        # A raw disk needs no extent walk: read straight through (holes read as zeros).
        view = memoryview(buf).cast("B")
        self._range(offset, len(view))
        self.host.pread_into(offset, view)

    def host_file_for(self, ext: Extent) -> HostFile | None:
        return self.host

    def _close_layer(self) -> None:
        self.host.close()


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> RawDisk:
    """The registry's opener."""
    return RawDisk(host, path)


class RawWriter:
    """A raw image open for writing in place (a ``commit`` target), QEMU's locks held."""

    def __init__(self, path: str) -> None:
        from qcowlib.core.locks import take_write_locks

        self.filename = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise QcowlibIOError(f"cannot open {path}: {exc.strerror}", file=path) from None
        try:
            take_write_locks(self.fd, path)
            self.virtual_size = size_of(self.fd)  # a block device's size too
        except BaseException:
            os.close(self.fd)
            raise

    def _call(self, what: str, func: Callable[[], object]) -> None:
        try:
            func()
        except OSError as exc:
            raise QcowlibIOError(f"{what} failed: {exc.strerror}", file=self.filename) from None

    def resize(self, size: int, *, shrink: bool = False) -> None:
        if size < self.virtual_size and not shrink:
            raise QcowlibIOError("shrinking needs shrink=True", file=self.filename)
        self._call("ftruncate", lambda: os.ftruncate(self.fd, size))
        self.virtual_size = size

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._call("write", lambda: pwrite_all(self.fd, data, offset))

    def write_zeroes(self, offset: int, length: int) -> None:
        zero = bytes(min(length, 1 << 20))
        pos = offset
        while pos < offset + length:
            n = min(len(zero), offset + length - pos)
            self.write(pos, memoryview(zero)[:n])
            pos += n

    def flush(self) -> None:
        self._call("fsync", lambda: os.fsync(self.fd))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_writer(path: str) -> RawWriter:
    """The registry's in-place writer for raw images."""
    return RawWriter(path)
