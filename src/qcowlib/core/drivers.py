"""Output drivers: the contract between ``convert``/``flatten`` and each format's writer.

The registry (:mod:`qcowlib.formats.registry`) names one driver per writable format
(``formats/<fmt>/driver.py``);
``convert`` and ``flatten`` call it without knowing which format it is.  A driver:

* ``check(request)`` refuses what the format cannot do (compression, a backing file,
  unknown ``-o`` options) before the source is opened, as qemu-img does;
* ``convert(disk, dst, request, progress, protect)`` writes the whole image to ``dst``
  (a temporary name, renamed when complete; ``protect`` lists files it must not
  replace);
* ``stream(disk, request, chunk_size)`` returns the image as an in-order stream of
  exactly known size (None: the format has no stream writer);
* ``flatten_file(disk, dst, request, progress, protect)`` writes a standalone image
  faster than streaming it to a file, or returns None to let ``flatten`` stream it.

Writers and serializers load only when their format is asked for.  The helpers below
give every driver qemu-img's refusals with qemu-img's words.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from qcowlib.errors import InvalidArgument

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk

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
    byte (each format's ``stream.py``)."""

    size: int

    def chunks(self, progress: Progress | None = None) -> Iterator[bytes]: ...


class OutputDriver(Protocol):
    """A format's writer of new images (``convert -O``, ``flatten -O``).

    ``check`` refuses what the format cannot do before the source is opened;
    ``convert`` writes the whole image to ``dst`` (under a temporary name, never over a
    file in ``protect``); ``flatten_file`` writes a standalone image faster than
    streaming it, or returns None; ``stream`` returns the image as an in-order stream of
    exactly known size, or None when the format has no stream writer.  ``sparse`` says
    whether zero blocks of a streamed image may be left as holes in a file.
    """

    name: str
    sparse: bool

    def check(self, request: OutputRequest) -> None: ...

    def convert(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
    ) -> None: ...

    def flatten_file(
        self,
        disk: Disk,
        dst: str,
        request: OutputRequest,
        progress: Progress | None,
        protect: tuple[str, ...],
    ) -> int | None: ...

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> Serializer | None: ...


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
    """A driver for writers that take only ``-o subformat=dynamic|fixed`` and write
    files, with no stream (VHD and VHDX).  ``write(disk, fd, subformat=, progress=)``
    is given as a callable, so each format's room names its own writer."""

    sparse: Final = False

    def __init__(self, name: str, write: Callable[..., object]) -> None:
        self.name = name
        self._write = write

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
    ) -> None:
        from qcowlib.core.sinks import atomic_output

        with atomic_output(dst, protect=protect) as fd:
            self._write(disk, fd, subformat=self._subformat(request), progress=progress)

    def flatten_file(self, *_: object) -> None:
        return None

    def stream(self, disk: Disk, request: OutputRequest, chunk_size: int) -> None:
        return None
