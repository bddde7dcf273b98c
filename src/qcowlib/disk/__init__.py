"""Random-access images: the only layer that reads or writes image files."""

from qcowlib.disk.base import Disk, Extent, ExtentKind
from qcowlib.disk.chain import SAFE, BackingPolicy

__all__ = ["SAFE", "BackingPolicy", "Disk", "Extent", "ExtentKind"]
