"""Raw images: the file is the disk."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from qcowlib.disk._file import HostFile
from qcowlib.disk.base import Disk, Extent, ExtentKind

if TYPE_CHECKING:
    from qcowlib.disk.chain import BackingPolicy


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
