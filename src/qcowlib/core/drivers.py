"""Output drivers: the contract between ``convert``/``flatten`` and each format's writer.

The registry (:mod:`qcowlib.formats.registry`) names one driver per writable format
(``formats/<fmt>/driver.py``);
``convert`` and ``flatten`` call it without knowing which format it is.  A driver:

* ``check(request)`` refuses what the format cannot do (compression, a backing file,
  unknown ``-o`` options) before the source is opened, as qemu-img does;
* ``convert(disk, dst, request, progress, protect, hashers)`` writes the whole image to
  ``dst`` (a temporary name, renamed when complete; ``protect`` lists files it must not
  replace) and returns its size; ``request.standalone`` asks for ``flatten``'s image;
* ``stream(disk, request, chunk_size)`` returns the same image as an in-order stream of
  exactly known size.

Both come from the format's one output layout through the one emitter
(:mod:`qcowlib.core.emit`): file and stream differ only in the sink.  Writers load only
when their format is asked for.  The helpers below give every driver qemu-img's
refusals with qemu-img's words.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from qcowlib.errors import InvalidArgument

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.core.emit import HashSink, OutputLayout

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class OutputRequest:
    """What ``convert`` and ``flatten`` ask of a new image; the format's driver checks it.

    ``options`` are the ``-o`` options; ``backing``/``backing_format`` are ``-B``/``-F``;
    ``sparse_size`` is ``-S``; ``standalone`` (``flatten``) refuses anything that would
    make the image depend on another file or that Glance's image inspector refuses;
    ``extent_name`` is the file name a streamed VMDK's descriptor gives its extent;
    ``open_backing(path, fmt)`` opens the backing image an overlay output is made over.
    """

    options: Mapping[str, str]
    compress: bool = False
    backing: str | None = None
    backing_format: str | None = None
    sparse_size: int = 4096
    standalone: bool = False
    extent_name: str = ""
    open_backing: Callable[[str, str | None], Disk] | None = None


class Serializer(Protocol):
    """An image as an in-order stream whose exact ``size`` is known before its first
    byte (:class:`qcowlib.core.emit.LayoutStream`); ``hashers`` are fed every piece."""

    size: int

    def chunks(
        self, progress: Progress | None = None, hashers: Sequence[HashSink] = ()
    ) -> Iterator[bytes]: ...


class OutputDriver(Protocol):
    """A format's writer of new images (``convert -O``, ``flatten -O``).

    ``check`` refuses what the format cannot do before the source is opened;
    ``convert`` writes the whole image to ``dst`` (under a temporary name, never over a
    file in ``protect``), feeding ``hashers`` its bytes in file order, and returns its
    size; ``stream`` returns the image as an in-order stream of exactly known size.
    """

    name: str

    def check(self, request: OutputRequest) -> None: ...

    def convert(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
        hashers: Sequence[HashSink] = (),
    ) -> int: ...

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> Serializer: ...


__all__ = [
    "OutputDriver",
    "OutputRequest",
    "Progress",
    "Serializer",
    "SubformatDriver",
    "no_backing",
    "no_compress",
    "no_more_options",
]


def no_compress(request: OutputRequest) -> None:
    if request.compress:
        raise InvalidArgument("Compression not supported for this file format")


def no_backing(request: OutputRequest, name: str) -> None:
    if request.backing:
        raise InvalidArgument(f"Backing file not supported for file format '{name}'")


def no_more_options(opts: dict[str, str]) -> None:
    if opts:
        raise InvalidArgument(f"Invalid parameter '{next(iter(opts))}'")


class SubformatDriver:
    """A driver for writers that take only ``-o subformat=dynamic|fixed`` (VHD and
    VHDX).  ``layout(disk, subformat)`` is given as a callable, so each format's room
    names its own writer."""

    def __init__(self, name: str, layout: Callable[[Disk, str], OutputLayout]) -> None:
        self.name = name
        self._layout = layout

    def _subformat(self, request: OutputRequest) -> str:
        no_compress(request)
        no_backing(request, self.name)
        opts = dict(request.options)
        subformat = opts.pop("subformat", "dynamic")
        if subformat not in ("dynamic", "fixed"):
            raise InvalidArgument(f"Invalid subformat '{subformat}'")
        no_more_options(opts)
        return subformat

    def check(self, request: OutputRequest) -> None:
        self._subformat(request)

    def convert(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
        hashers: Sequence[HashSink] = (),
    ) -> int:
        from qcowlib.core.emit import write_image

        layout = self._layout(disk, self._subformat(request))
        return write_image(layout, dst, protect=protect, progress=progress, hashers=hashers)

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> Serializer:
        from qcowlib.core.emit import LayoutStream

        return LayoutStream(self._layout(disk, self._subformat(request)), chunk_size=chunk_size)
