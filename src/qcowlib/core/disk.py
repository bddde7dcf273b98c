"""The Disk protocol: random access to an image's guest-visible bytes and its extents.

A :class:`Disk` is one image file (one layer of a chain).  Each format implements
:meth:`Disk.layer_extents` (what *this* layer says about a range) and
:meth:`Disk._read_layer` (how to read this layer's data and compressed extents); the base
class resolves unallocated ranges through the backing disk, for reads and for
:meth:`Disk.extents`, which yields the same runs as ``qemu-img map``.
"""

from __future__ import annotations

import abc
import enum
import os
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol, Self

from qcowlib._json import JSONObject
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import DiskClosed, InvalidArgument

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


class ExtentKind(enum.Enum):
    """What a run of guest bytes is, at the layer that decides it."""

    #: Bytes stored uncompressed at ``host_offset`` in ``file``.
    DATA = "data"
    #: Reads as zeros; allocated in the file when ``host_offset`` is set.
    ZERO = "zero"
    #: Not decided by this layer: the backing file's content shows through (or zeros
    #: when there is no backing file or the range lies past its end).
    UNALLOCATED = "unallocated"
    #: One compressed cluster at ``host_offset`` (``compressed_length`` bytes at most).
    COMPRESSED = "compressed"


class Extent(NamedTuple):
    """A run of guest bytes ``[start, start + length)`` of one kind.

    In resolved extents (:meth:`Disk.extents`), ``depth`` is the chain index of the
    layer that decided the run (0 is the top image) and an ``UNALLOCATED`` run reads as
    zeros with nothing allocated anywhere in the chain.
    """

    start: int
    length: int
    kind: ExtentKind
    host_offset: int | None = None
    depth: int = 0
    file: str | None = None
    compressed_length: int = 0
    #: DATA whose host range is a hole in the file (qemu's "data" and "zero" both set).
    hole: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def present(self) -> bool:
        """Allocated at some layer (qemu-img map's ``present``)."""
        return self.kind is not ExtentKind.UNALLOCATED

    @property
    def reads_zero(self) -> bool:
        """Known to read as zeros without looking at data."""
        return self.kind in (ExtentKind.ZERO, ExtentKind.UNALLOCATED) or self.hole

    def clip(self, start: int, end: int) -> Extent:
        """The part of this extent inside ``[start, end)`` (host offsets shifted)."""
        s = max(start, self.start)
        e = min(end, self.end)
        host = self.host_offset
        if host is not None and self.kind is not ExtentKind.COMPRESSED:
            host += s - self.start
        # The constructor, not dataclasses.replace: this runs once per run of every map.
        return Extent(
            s, e - s, self.kind, host, self.depth, self.file, self.compressed_length, self.hole
        )

    def at_depth(self, depth: int) -> Extent:
        """This extent as decided by the chain's layer ``depth``."""
        return Extent(
            self.start,
            self.length,
            self.kind,
            self.host_offset,
            depth,
            self.file,
            self.compressed_length,
            self.hole,
        )

    def as_hole(self) -> Extent:
        """This DATA extent marked as a hole in its file."""
        return Extent(
            self.start,
            self.length,
            self.kind,
            self.host_offset,
            self.depth,
            self.file,
            self.compressed_length,
            True,
        )


# Run kinds in run arrays (small ints; the numbers qcow2's table codec uses).
RUN_UNALLOCATED: Final = 0
RUN_DATA: Final = 1
RUN_ZERO: Final = 2
RUN_COMPRESSED: Final = 3
RUN_KINDS: Final = (
    ExtentKind.UNALLOCATED,
    ExtentKind.DATA,
    ExtentKind.ZERO,
    ExtentKind.COMPRESSED,
)


class Runs:
    """Extents as parallel numpy arrays, in guest order with no gaps.

    Row ``i`` is the extent ``[start[i], start[i] + length[i])`` of kind
    ``RUN_KINDS[kind[i]]``; ``host`` is its host offset (-1: none), ``clen`` the
    compressed length bound, ``hole`` marks DATA that is a hole in its file, ``depth``
    the chain index of the layer that decided it and ``file`` an index into ``files``
    (the extent's file name).  A layer's runs (:meth:`Disk.layer_runs`) have depth 0.
    """

    start: npt.NDArray[np.int64]
    length: npt.NDArray[np.int64]
    kind: npt.NDArray[np.uint8]
    host: npt.NDArray[np.int64]
    clen: npt.NDArray[np.int64]
    hole: npt.NDArray[np.bool_]
    depth: npt.NDArray[np.int64]
    file: npt.NDArray[np.int64]
    files: tuple[str | None, ...]

    __slots__ = ("clen", "depth", "file", "files", "hole", "host", "kind", "length", "start")

    def __init__(
        self,
        start: npt.NDArray[np.int64],
        length: npt.NDArray[np.int64],
        kind: npt.NDArray[np.uint8],
        host: npt.NDArray[np.int64],
        clen: npt.NDArray[np.int64],
        hole: npt.NDArray[np.bool_],
        depth: npt.NDArray[np.int64],
        file: npt.NDArray[np.int64],
        files: tuple[str | None, ...],
    ) -> None:
        # A plain class, not a dataclass: ``dataclasses`` imports ``inspect`` (~5 ms) and
        # this module is on every metadata command's path.
        self.start, self.length, self.kind, self.host = start, length, kind, host
        self.clen, self.hole, self.depth, self.file, self.files = clen, hole, depth, file, files

    def __len__(self) -> int:
        return int(self.start.size)

    def extent(self, i: int) -> Extent:
        """Row ``i`` as an :class:`Extent`."""
        host = int(self.host[i])
        return Extent(
            int(self.start[i]),
            int(self.length[i]),
            RUN_KINDS[int(self.kind[i])],
            host if host >= 0 else None,
            int(self.depth[i]),
            self.files[int(self.file[i])],
            int(self.clen[i]),
            bool(self.hole[i]),
        )

    def extents(self) -> Iterator[Extent]:
        """Every row as an :class:`Extent` (for callers that want objects)."""
        for i in range(len(self)):
            yield self.extent(i)


def runs_from_extents(extents: Iterator[Extent]) -> Runs:
    """Run arrays of ``extents`` (the generic path for formats without a vectorised map)."""
    import numpy as np

    files: dict[str | None, int] = {}
    rows = [
        (
            e.start,
            e.length,
            RUN_KINDS.index(e.kind),
            -1 if e.host_offset is None else e.host_offset,
            e.compressed_length,
            e.hole,
            e.depth,
            files.setdefault(e.file, len(files)),
        )
        for e in extents
    ]
    cols = list(zip(*rows, strict=True)) if rows else [()] * 8
    return Runs(
        np.array(cols[0], dtype=np.int64),
        np.array(cols[1], dtype=np.int64),
        np.array(cols[2], dtype=np.uint8),
        np.array(cols[3], dtype=np.int64),
        np.array(cols[4], dtype=np.int64),
        np.array(cols[5], dtype=np.bool_),
        np.array(cols[6], dtype=np.int64),
        np.array(cols[7], dtype=np.int64),
        tuple(files),
    )


def mergeable(a: Extent, b: Extent) -> bool:
    """Whether ``b`` continues ``a`` (same kind, depth and file; contiguous host bytes)."""
    if a.end != b.start or a.kind is not b.kind or a.depth != b.depth or a.file != b.file:
        return False
    if a.hole != b.hole or a.kind is ExtentKind.COMPRESSED:
        return False
    if (a.host_offset is None) != (b.host_offset is None):
        return False
    return a.host_offset is None or a.host_offset + a.length == b.host_offset


def coalesce(extents: Iterator[Extent]) -> Iterator[Extent]:
    """Merge adjacent extents that :func:`mergeable` joins."""
    current: Extent | None = None
    for ext in extents:
        if ext.length == 0:
            continue
        if current is not None and mergeable(current, ext):
            current = current._replace(length=current.length + ext.length)
            continue
        if current is not None:
            yield current
        current = ext
    if current is not None:
        yield current


class PersistentBitmap(Protocol):
    """A persistent dirty bitmap stored in an image (what ``measure`` needs of it)."""

    @property
    def name(self) -> str: ...

    @property
    def granularity(self) -> int: ...


class Writer(Protocol):
    """An image open for writing in place (``commit`` writes into its backing file
    through this; a format's registry entry names how to open one)."""

    filename: str
    virtual_size: int

    def resize(self, size: int, *, shrink: bool = False) -> None: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class Disk(abc.ABC):
    """One open image (a layer), with its backing disk if the chain was followed."""

    #: qemu-img's name for the format ("qcow2", "raw", ...).
    format: str
    #: The name the image was opened by (as qemu-img shows it).
    filename: str
    virtual_size: int
    backing: Disk | None = None
    #: True after :meth:`close`: reading then raises :class:`DiskClosed`.
    closed: bool = False
    #: Data on disk is ciphertext: host offsets are not the guest's bytes (``map`` shows
    #: none, copies read through :meth:`_read_layer`).
    encrypted: bool = False

    # -- to implement --------------------------------------------------------------------
    @abc.abstractmethod
    def layer_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """This layer's runs over ``[offset, offset + length)``, in order, no gaps."""

    @abc.abstractmethod
    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        """Fill ``buf`` (``ext.length`` bytes) from a DATA or COMPRESSED layer extent."""

    @abc.abstractmethod
    def _close_layer(self) -> None:
        """Release this layer's resources."""

    def host_file_for(self, ext: Extent) -> HostFile | None:
        """The file a DATA layer extent's ``host_offset`` refers to (for kernel copies)."""
        return None

    # -- links to other files (defaults: a standalone image) ---------------------------
    @property
    def backing_file_name(self) -> str | None:
        """The backing file name recorded in the image (a VMDK delta disk's parent)."""
        return None

    @property
    def backing_file_format(self) -> str | None:
        """The backing file's format as the image records it (not yet validated)."""
        return None

    def check_parent(self, parent: Disk) -> None:  # noqa: B027 - an optional hook
        """Refuse a backing disk this layer cannot read over (default: any is fine)."""

    @property
    def data_file_name(self) -> str | None:
        """The external data file the image names, if any."""
        return None

    def attach_data_file(self, host: HostFile, path: str) -> None:
        """Use ``host`` (opened from ``path``) as the external data file."""
        raise InvalidArgument("this image has no external data file", file=self.filename)

    @property
    def file_is_disk(self) -> bool:
        """Whether the image file's bytes are exactly the guest disk (a plain raw image)."""
        return False

    @property
    def supports_persistent_bitmaps(self) -> bool:
        """Whether the format can store persistent dirty bitmaps (qcow2 v3)."""
        return False

    def persistent_bitmaps(self) -> Sequence[PersistentBitmap]:
        """The persistent dirty bitmaps stored in this layer."""
        return ()

    # -- what ``qemu-img info`` shows (keys and order as qemu-img 7.2) ------------------
    def info_head(self) -> JSONObject:
        """Keys qemu-img prints before ``virtual-size`` (snapshots, backing format)."""
        return {}

    @property
    def info_cluster_size(self) -> int | None:
        """The ``cluster-size`` qemu-img reports, if the format has one."""
        return None

    def info_tail(self) -> JSONObject:
        """Keys qemu-img prints after ``actual-size`` (format-specific data, backing
        names, dirty flag)."""
        return {"dirty-flag": False}

    def actual_size(self) -> int | None:
        """Bytes the image's files occupy on the host (``actual-size``)."""
        host = getattr(self, "host", None)
        return host.allocated if isinstance(host, HostFile) else None

    def layer_runs(self, offset: int, end: int) -> Runs:
        """This layer's runs over ``[offset, end)`` as arrays (what :meth:`layer_extents`
        yields).  Formats with many runs override this with a vectorised version."""
        return runs_from_extents(self.layer_extents(offset, end - offset))

    @property
    def run_granule(self) -> int:
        """The shortest guest length one of this layer's runs can have, in bytes (a
        sector unless the format says more): a range of N bytes holds at most
        N / run_granule runs, which is what keeps resolving windows bounded
        (:class:`qcowlib.core.runs.RunSource`)."""
        return 512

    def runs_data_file(self) -> HostFile | None:
        """The file every DATA run of this layer is plain bytes of, at ``host`` (None:
        read through :meth:`_read_layer`).  Lets copies read runs without building
        :class:`Extent` objects."""
        return None

    # -- shared behaviour ----------------------------------------------------------------
    @property
    def chain(self) -> list[Disk]:
        """This disk and its backing disks, top first."""
        out: list[Disk] = []
        d: Disk | None = self
        while d is not None:
            out.append(d)
            d = d.backing
        return out

    def _range(self, offset: int, length: int | None) -> tuple[int, int]:
        if self.closed:
            raise DiskClosed(file=self.filename)
        if length is None:
            length = self.virtual_size - offset
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise InvalidArgument(
                f"range {offset}+{length} is outside the disk (virtual size {self.virtual_size})"
            )
        return offset, offset + length

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Resolved runs through the whole chain, merged as ``qemu-img map`` merges them."""
        start, end = self._range(offset, length)
        return coalesce(self._resolve(start, end, 0))

    def _resolve(self, start: int, end: int, depth: int) -> Iterator[Extent]:
        # Without recursion (chains may be thousands of images deep): each layer's
        # walk yields its extents, or the walk of its backing over a gap, which is
        # pushed and drained first, so the order is the guest's.
        stack: list[Iterator[Extent | Iterator[Any]]] = [self._resolve_layer(start, end, depth)]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
            elif isinstance(item, Extent):
                yield item
            else:
                stack.append(item)

    def _resolve_layer(self, start: int, end: int, depth: int) -> Iterator[Extent | Iterator[Any]]:
        """This layer's extents over ``[start, end)``; a gap left to the backing disk
        comes as that disk's own (lazy) walk, for :meth:`_resolve` to drain."""
        for ext in self.layer_extents(start, end - start):
            if ext.kind is not ExtentKind.UNALLOCATED:
                yield ext.at_depth(depth)
                continue
            # An unallocated extent may keep a host offset (an allocated cluster whose
            # subcluster is not): qemu-img map shows it where this layer decides.
            backing = self.backing
            if backing is None:
                yield ext.at_depth(depth)
                continue
            split = min(ext.end, max(ext.start, backing.virtual_size))
            if split > ext.start:
                yield backing._resolve_layer(ext.start, split, depth + 1)
            if split < ext.end:
                # Past the backing file's end the overlay reads zeros (qemu: ZERO, not
                # allocated, decided at this layer).
                yield ext.clip(split, ext.end).at_depth(depth)

    def read_into(self, offset: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` with guest bytes from ``offset`` (raises InvalidArgument past the end)."""
        view = memoryview(buf).cast("B")
        self._range(offset, len(view))
        # A work list instead of recursion: chains may be thousands of images deep.
        work: list[tuple[Disk, int, memoryview]] = [(self, offset, view)]
        while work:
            disk, pos, part = work.pop()
            if disk is self or type(disk).read_into is Disk.read_into:
                work.extend(disk._read_own(pos, part))
            else:  # a format with its own read_into (raw, vdi): no backing below it
                disk.read_into(pos, part)

    def _read_own(self, offset: int, view: memoryview) -> list[tuple[Disk, int, memoryview]]:
        """Fill what this layer decides of ``view`` (guest ``offset``); return the parts
        its backing disk must fill."""
        start, end = offset, offset + len(view)
        below: list[tuple[Disk, int, memoryview]] = []
        for ext in self.layer_extents(start, end - start):
            part = view[ext.start - start : ext.end - start]
            if ext.kind is ExtentKind.DATA or ext.kind is ExtentKind.COMPRESSED:
                self._read_layer(ext, part)
            elif ext.kind is ExtentKind.ZERO or self.backing is None:
                part[:] = bytes(len(part)) if len(part) < 65536 else _zeros(len(part))
            else:
                backing = self.backing
                split = min(ext.end, max(ext.start, backing.virtual_size))
                if split > ext.start:
                    below.append((backing, ext.start, part[: split - ext.start]))
                if split < ext.end:
                    part[split - ext.start :] = _zeros(ext.end - split)
        return below

    def read_extent(self, ext: Extent, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes of a resolved extent (from :meth:`extents`).

        Reads straight from the layer that holds the data, with no second walk of the
        chain; ``len(buf)`` must equal ``ext.length``.
        """
        if self.closed:
            raise DiskClosed(file=self.filename)
        if ext.kind is ExtentKind.DATA or ext.kind is ExtentKind.COMPRESSED:
            self.chain[ext.depth]._read_layer(ext, buf)
        else:
            buf[:] = _zeros(len(buf))

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes ``[offset, offset + length)``."""
        buf = bytearray(length)
        self.read_into(offset, buf)
        return bytes(buf)

    def close(self) -> None:
        """Close this disk and its backing chain (closing twice is harmless)."""
        for d in self.chain:
            if not d.closed:
                d.closed = True
                d._close_layer()

    def __repr__(self) -> str:
        text = f"<{type(self).__name__} {self.format} {self.filename!r}"
        text += f" virtual_size={self.virtual_size}"
        if self.backing_file_name is not None:
            text += f" backing={self.backing_file_name!r}"
        return text + (" closed>" if self.closed else ">")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def full_backing_filename(filename: str, backing: str) -> str:
    """qemu's ``path_combine``: a relative backing name joined to the image's directory."""
    if os.path.isabs(backing):
        return backing
    directory = os.path.dirname(filename)
    return os.path.join(directory, backing) if directory else backing


_ZERO_CHUNK = bytes(1 << 20)


def _zeros(n: int) -> bytes | bytearray:
    if n <= len(_ZERO_CHUNK):
        return _ZERO_CHUNK[:n] if n < len(_ZERO_CHUNK) else _ZERO_CHUNK
    return bytearray(n)


class EmptyDisk(Disk):
    """A disk of ``virtual_size`` bytes that are all zeros, with nothing allocated:
    what ``create`` hands a format's writer, so that a new empty image is the writer's
    output for a source with no data (no second writer per format)."""

    format = "empty"

    def __init__(self, virtual_size: int, filename: str = "") -> None:
        if virtual_size < 0:
            raise InvalidArgument("Image size must be a non-negative number")
        self.virtual_size = virtual_size
        self.filename = filename

    def layer_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        start, end = self._range(offset, length)
        if end > start:
            yield Extent(start, end - start, ExtentKind.UNALLOCATED)

    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        buf[:] = _zeros(len(buf))

    def _close_layer(self) -> None:
        return None


class SliceDisk(Disk):
    """``length`` bytes of ``inner``'s guest disk from ``offset``, as a disk of its own
    (one extent of a split output: each is written by the format's one writer).  Runs
    come from ``inner``'s resolved map; data is read through ``inner``.  Closing the
    slice leaves ``inner`` open."""

    format = "slice"

    def __init__(self, inner: Disk, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > inner.virtual_size:
            raise InvalidArgument(f"slice {offset}+{length} is outside the disk")
        self.inner = inner
        self.offset = offset
        self.virtual_size = length
        self.filename = inner.filename

    def layer_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        start, end = self._range(offset, length)
        if end <= start:
            return
        for ext in self.inner.extents(self.offset + start, end - start):
            kind = ExtentKind.ZERO if ext.reads_zero else ExtentKind.DATA
            yield Extent(ext.start - self.offset, ext.length, kind)

    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        self.inner.read_into(self.offset + ext.start, buf)

    def _close_layer(self) -> None:
        return None
