"""``check``: consistency check and repair of qcow2 images, as ``qemu-img check`` does it.

The algorithm is QEMU 7.2's, step for step, so that counts, messages and exit statuses
agree with ``qemu-img check`` (``block/qcow2-refcount.c``: ``qcow2_check_refcounts``,
``calculate_refcounts``, ``check_refcounts_l1``/``check_refcounts_l2``,
``check_refblocks``, ``compare_refcounts``, ``check_oflag_copied``,
``rebuild_refcount_structure``; ``block/qcow2-snapshot.c``:
``qcow2_check_read_snapshot_table``; ``block/qcow2-bitmap.c``:
``qcow2_check_bitmaps_refcounts``; ``qemu-img.c``: ``img_check``):

1. Every reference that metadata makes to a host cluster is counted into an in-memory
   refcount table (QEMU's *IMRT*): the header, the active and every snapshot's L1 table,
   their L2 tables and the data clusters those reference (a compressed cluster counts
   every host cluster its byte range touches, so several may share one), the snapshot
   table, the refcount table and blocks, the crypto header area and the persistent
   bitmaps' directory, tables and data.  Each L2 table is decoded whole with numpy and
   its references are counted with ``np.bincount``; only entries with something to
   report are looked at one by one.
2. The IMRT is compared with the refcounts stored on disk: a stored refcount lower than
   the references is a *corruption*, a higher one a *leak*.
3. ``OFLAG_COPIED`` is checked on every active L1 and L2 entry.

Repair (``repair="leaks"`` or ``"all"``) opens the file read-write and fixes what QEMU
fixes, writing refcount blocks, the refcount table (rebuilt from the IMRT when needed),
L1/L2 flag bits and header fields, never guest data.  As ``qemu-img check -r`` does, a
repair that fixed anything is followed by a second, read-only pass whose result is
reported together with the fixed counts.

Messages QEMU prints to stderr while checking (``ERROR cluster 5 refcount=0
reference=1``, ``Leaked cluster ...``, ``Repairing ...``) are collected in
:attr:`CheckReport.messages`, in QEMU's order.

Where qcowlib deliberately differs from qemu-img 7.2:

* Only qcow2 is checked (vmdk, vdi and vhdx raise :class:`UnsupportedFeature`).
  Encrypted images are checked without their key (the check never decrypts).
* Repair punches holes where the leaked clusters it frees were, as QEMU's discard does,
  but only when the image has no other error (QEMU discards them even when they only
  look leaked because a broken table could not be followed).  It does not touch
  persistent bitmaps (QEMU re-stores them whenever it opens an image read-write).
* Caps on hostile input: :data:`MAX_CHECK_CLUSTERS`, :data:`MAX_REPAIR_GROWTH` (QEMU
  extends a file to any offset a corrupt refcount table names) and :data:`MAX_MESSAGES`.
* After QEMU signals a fatal corruption while repairing, it marks the image corrupt and
  stops using it, so its second pass fails; qcowlib marks it too but carries on.
* The snapshot table is rewritten (``-r all``) only where its new clusters already have
  a refcount block; otherwise the problem stays reported.
* Messages for images that cannot be opened at all use qcowlib's wording.
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from qcowlib.errors import (
    CorruptImage,
    InvalidArgument,
    QcowlibError,
    TruncatedImage,
    UnsupportedFeature,
)
from qcowlib.formats.qcow2 import bitmap as _bitmap
from qcowlib.formats.qcow2 import header as _header
from qcowlib.formats.qcow2 import refcount as _refcount
from qcowlib.formats.qcow2 import snapshot as _snapshot
from qcowlib.formats.qcow2 import tables as _tables

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from qcowlib.disk._file import HostFile
    from qcowlib.disk.qcow2_repair import RepairWriter
    from qcowlib.formats.qcow2.header import Header

    I64 = npt.NDArray[np.int64]
    U64 = npt.NDArray[np.uint64]
    Bools = npt.NDArray[np.bool_]
    Counts = npt.NDArray[Any]

__all__ = ["CheckNotSupported", "CheckReport", "check"]

# --- qcow2 constants (QEMU block/qcow2.h) ----------------------------------------------
# The table codecs' constants, under the names QEMU's check code uses.
L1E_OFFSET_MASK: Final = _tables.OFFSET_MASK
L1E_RESERVED_MASK: Final = _tables.L1E_RESERVED_MASK
L2E_OFFSET_MASK: Final = _tables.OFFSET_MASK
L2E_STD_RESERVED_MASK: Final = _tables.L2E_STD_RESERVED_MASK
REFT_OFFSET_MASK: Final = _refcount.REFT_OFFSET_MASK
REFT_RESERVED_MASK: Final = 0x1FF
QCOW_OFLAG_COPIED: Final = _tables.OFLAG_COPIED
QCOW_OFLAG_COMPRESSED: Final = _tables.OFLAG_COMPRESSED
QCOW_OFLAG_ZERO: Final = _tables.OFLAG_ZERO
QCOW_L2_BITMAP_ALL_ALLOC: Final = 0xFFFF_FFFF
QCOW_L2_BITMAP_ALL_ZEROES: Final = QCOW_L2_BITMAP_ALL_ALLOC << 32
#: QCOW_MAX_L1_SIZE: a snapshot L1 table larger than this is reported, not read.
QCOW_MAX_L1_SIZE: Final = _header.MAX_L1_SIZE_BYTES
#: QCOW_MAX_SNAPSHOT_EXTRA_DATA and QCOW_MAX_SNAPSHOTS_SIZE (qcow2.h).
QCOW_MAX_SNAPSHOT_EXTRA_DATA: Final = _header.MAX_SNAPSHOT_EXTRA_DATA
QCOW_MAX_SNAPSHOTS_SIZE: Final = _snapshot.MAX_SNAPSHOTS_SIZE
SNAPSHOT_HEADER_SIZE: Final = _snapshot.SNAPSHOT_HEADER_SIZE
SNAPSHOT_EXTRA_SIZE: Final = _snapshot.SNAPSHOT_EXTRA_SIZE
#: Bitmap directory caps and entry constraints (qcow2-bitmap.c).
QCOW2_MAX_BITMAP_DIRECTORY_SIZE: Final = _bitmap.MAX_BITMAP_DIRECTORY_SIZE
BME_MAX_TABLE_SIZE: Final = 0x800_0000
BME_MAX_PHYS_SIZE: Final = 0x2000_0000
BME_MAX_GRANULARITY_BITS: Final = 31
BME_MIN_GRANULARITY_BITS: Final = 9
BME_MAX_NAME_SIZE: Final = 1023
BME_RESERVED_FLAGS: Final = 0xFFFF_FFFC
BME_TABLE_ENTRY_RESERVED_MASK: Final = 0xFF00_0000_0000_01FE
BME_TABLE_ENTRY_OFFSET_MASK: Final = 0x00FF_FFFF_FFFF_FE00
BME_TABLE_ENTRY_FLAG_ALL_ONES: Final = 1
BT_DIRTY_TRACKING_BITMAP: Final = 1
#: qcow2_check_refcounts refuses files with more clusters than this (-EFBIG).
INT_MAX: Final = 2**31 - 1
INT64_MAX: Final = 2**63 - 1
#: BDRV_MAX_LENGTH: QEMU's block layer fails reads and writes that end past this.
BDRV_MAX_LENGTH: Final = INT64_MAX & ~((1 << 30) - 1)

# BdrvCheckMode
BDRV_FIX_LEAKS: Final = 1
BDRV_FIX_ERRORS: Final = 2

# QCow2MetadataOverlap bits, and the default "cached" overlap-check mode.
QCOW2_OL_MAIN_HEADER: Final = 1 << 0
QCOW2_OL_ACTIVE_L1: Final = 1 << 1
QCOW2_OL_ACTIVE_L2: Final = 1 << 2
QCOW2_OL_REFCOUNT_TABLE: Final = 1 << 3
QCOW2_OL_REFCOUNT_BLOCK: Final = 1 << 4
QCOW2_OL_SNAPSHOT_TABLE: Final = 1 << 5
QCOW2_OL_INACTIVE_L1: Final = 1 << 6
QCOW2_OL_INACTIVE_L2: Final = 1 << 7
QCOW2_OL_BITMAP_DIRECTORY: Final = 1 << 8
QCOW2_OL_CACHED: Final = 0x1FF & ~QCOW2_OL_INACTIVE_L2

# strerror() texts QEMU prints for the errnos a check can end with.
EIO: Final = "Input/output error"
EINVAL: Final = "Invalid argument"
EFBIG: Final = "File too large"
ENOMEM: Final = "Cannot allocate memory"

#: Messages kept per check: a hostile image can make QEMU print billions of lines.
#: The counts stay exact; the lines past this many are dropped (and say so).
MAX_MESSAGES: Final = 1 << 18
#: The largest image (in clusters of the qcow2 file) checked: the in-memory refcount
#: table takes 4 bytes per cluster, so this caps it at 2 GiB.  (QEMU's own limit is
#: INT_MAX clusters at refcount_bits/8 bytes each.)  That is 32 TiB of 64 KiB clusters.
MAX_CHECK_CLUSTERS: Final = 1 << 29
#: How far ``-r all`` extends a file to reach a refcount block past its end: QEMU
#: extends to any offset; beyond this the block is dropped and the refcount structure
#: rebuilt instead, so that a corrupt offset cannot create a huge sparse file.
MAX_REPAIR_GROWTH: Final = 1 << 30
#: Decoded L2 tables whose references are remembered for reuse (snapshot L1 tables
#: usually share L2 tables with the active one), in entries.
L2_CACHE_ENTRIES: Final = 1 << 22
#: Decoded refcount blocks kept in memory while checking.
REFBLOCK_CACHE_BLOCKS: Final = 1024
#: Clusters compared per window in compare_refcounts.
COMPARE_WINDOW: Final = 1 << 22
#: Above this many references in one pass, overflow messages are not ordered exactly.
EXACT_OVERFLOW_REFS: Final = 1 << 23

_OL_NAMES: Final = {
    QCOW2_OL_MAIN_HEADER: "qcow2_header",
    QCOW2_OL_ACTIVE_L1: "active L1 table",
    QCOW2_OL_ACTIVE_L2: "active L2 table",
    QCOW2_OL_REFCOUNT_TABLE: "refcount table",
    QCOW2_OL_REFCOUNT_BLOCK: "refcount block",
    QCOW2_OL_SNAPSHOT_TABLE: "snapshot table",
    QCOW2_OL_INACTIVE_L1: "inactive L1 table",
    QCOW2_OL_INACTIVE_L2: "inactive L2 table",
    QCOW2_OL_BITMAP_DIRECTORY: "bitmap directory",
}

#: Formats qemu-img has no check for (``qemu-img check`` exits 63).
_NOTHING_TO_CHECK: Final = ("raw", "iso", "vpc", "luks")

#: qemu-img's JSON key order (QDict bucket order of the ImageCheck members).
_JSON_ORDER: Final = (
    "image-end-offset",
    "compressed-clusters",
    "total-clusters",
    "corruptions",
    "corruptions-fixed",
    "check-errors",
    "leaks",
    "leaks-fixed",
    "allocated-clusters",
    "filename",
    "format",
    "fragmented-clusters",
)


class CheckNotSupported(UnsupportedFeature):
    """The image format has nothing to check (``qemu-img check`` exits 63 for it)."""

    status = 63


@dataclass(frozen=True)
class CheckReport:
    """The result of :func:`check`, with ``qemu-img check``'s fields and meaning.

    After a repair that fixed something, the counts describe the image *after* the
    repair (qemu-img's second pass) and ``corruptions_fixed``/``leaks_fixed`` what the
    repair fixed.  ``failure`` is set when the check could not complete (qemu-img prints
    ``Check failed: ...`` and no result); ``messages`` are the lines qemu-img prints to
    stderr while checking.
    """

    filename: str
    format: str
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    #: True when a repair fixed something and the counts come from the second pass.
    repaired: bool = False
    failure: str | None = None
    messages: tuple[str, ...] = ()

    @property
    def status(self) -> int:
        """qemu-img check's exit status: 0 clean, 1 failed, 2 corrupt, 3 leaks only."""
        if self.failure is not None or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict[str, Any]:
        """``qemu-img check --output=json``'s object (same keys, order and omissions)."""
        values: dict[str, Any] = {
            "image-end-offset": self.image_end_offset,
            "compressed-clusters": self.compressed_clusters,
            "total-clusters": self.total_clusters,
            "corruptions": self.corruptions,
            "corruptions-fixed": self.corruptions_fixed,
            "check-errors": self.check_errors,
            "leaks": self.leaks,
            "leaks-fixed": self.leaks_fixed,
            "allocated-clusters": self.allocated_clusters,
            "filename": self.filename,
            "format": self.format,
            "fragmented-clusters": self.fragmented_clusters,
        }
        always = ("filename", "format", "check-errors")
        return {k: values[k] for k in _JSON_ORDER if k in always or values[k]}

    def human(self) -> str:
        """``qemu-img check``'s human output (stdout), byte for byte."""
        out: list[str] = []
        if self.repaired:
            out.append(
                "The following inconsistencies were found and repaired:\n\n"
                f"    {self.leaks_fixed} leaked clusters\n"
                f"    {self.corruptions_fixed} corruptions\n\n"
                "Double checking the fixed image now...\n"
            )
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.\n")
        else:
            if self.corruptions:
                out.append(
                    f"\n{self.corruptions} errors were found on the image.\n"
                    "Data may be corrupted, or further writes to the image may corrupt it.\n"
                )
            if self.leaks:
                out.append(
                    f"\n{self.leaks} leaked clusters were found on the image.\n"
                    "This means waste of disk space, but no harm to data.\n"
                )
            if self.check_errors:
                out.append(
                    f"\n{self.check_errors} internal errors have occurred during the check.\n"
                )
        if self.total_clusters and self.allocated_clusters:
            alloc = self.allocated_clusters
            out.append(
                f"{alloc}/{self.total_clusters} = "
                f"{alloc * 100.0 / self.total_clusters:.2f}% allocated, "
                f"{self.fragmented_clusters * 100.0 / alloc:.2f}% fragmented, "
                f"{self.compressed_clusters * 100.0 / alloc:.2f}% compressed clusters\n"
            )
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}\n")
        return "".join(out)


def check(path: str, fmt: str | None = None, repair: str | None = None) -> CheckReport:
    """Check an image's metadata for consistency, and optionally repair it.

    ``repair`` is None (only read; the file is opened read-only), ``"leaks"`` (free
    clusters that are allocated but unused) or ``"all"`` (also fix refcounts that are too
    low, rebuild the refcount structure when needed, and fix ``OFLAG_COPIED`` and
    misaligned preallocated zero clusters).  The format is probed unless ``fmt`` is given.
    A backing chain and an external data file must be openable, as for qemu-img.

    Problems found *in* the image are counted in the report, not raised.  Raises
    :class:`CheckNotSupported` for formats without checks (raw: qemu-img exits 63),
    :class:`UnsupportedFeature` for formats qcowlib cannot check yet,
    :class:`InvalidArgument` for a bad ``fmt`` or ``repair``, and other
    :class:`QcowlibError` subclasses when the image cannot be opened at all (bad header,
    missing file, backing file or data file) or written while repairing.
    """
    from qcowlib.disk._file import HostFile
    from qcowlib.disk.chain import probe_format
    from qcowlib.formats import detect

    modes = {None: 0, "leaks": BDRV_FIX_LEAKS, "all": BDRV_FIX_LEAKS | BDRV_FIX_ERRORS}
    if repair not in modes:
        raise InvalidArgument(f"repair must be 'leaks' or 'all', not {repair!r}")
    fix = modes[repair]
    if fmt is not None and fmt not in detect.FORMATS:
        raise InvalidArgument(f"unknown format {fmt!r}")
    host = HostFile(path, writable=bool(fix))
    try:
        if fix:
            # Repair writes: take QEMU's locks so a running VM's disk is never touched.
            from qcowlib.disk.qcow2_rw import take_write_locks

            take_write_locks(host.fd, path)
        detected = fmt if fmt is not None else probe_format(host)
        if detected in _NOTHING_TO_CHECK:
            raise CheckNotSupported(f"{detected} images have nothing to check", file=path)
        if detected != "qcow2":
            raise UnsupportedFeature(f"checking {detected} images is not supported", file=path)
        header = _read_header(host)
        _open_linked_files(path, header)
        return _check_qcow2(host, header, path, fix)
    finally:
        host.close()


# --------------------------------------------------------------------------------------
# opening


def _read_header(host: HostFile) -> Header:
    """Parse the header as QEMU's open does in check mode (tables may lie past EOF)."""
    from qcowlib.formats.qcow2 import header as hdr

    if host.size < hdr.V2_HEADER_LENGTH:
        raise TruncatedImage("qcow2 header is truncated", file=host.path, structure="header")
    head = host.pread(0, min(host.size, 4096))
    cluster_bits = int.from_bytes(head[20:24], "big")
    if hdr.MIN_CLUSTER_BITS <= cluster_bits <= hdr.MAX_CLUSTER_BITS and (1 << cluster_bits) > 4096:
        head = host.pread(0, min(host.size, 1 << cluster_bits))
    try:
        h = hdr.parse_header(head, None)
        _validate_bitmaps_extension(h)
    except QcowlibError as exc:
        raise exc.with_file(host.path) from None
    return h


def _validate_bitmaps_extension(h: Header) -> None:
    """The checks qcow2_read_extensions makes on the bitmaps extension at open."""
    from qcowlib.formats.qcow2 import header as hdr

    ext = h.bitmaps
    if ext is None or not h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
        return
    raw = next(e.data for e in h.extensions if e.type == hdr.EXT_BITMAPS)
    if struct.unpack_from(">I", raw, 4)[0] != 0:
        raise CorruptImage("bitmaps extension: reserved field is not zero", structure="header")
    if ext.nb_bitmaps > 65535:
        raise CorruptImage("bitmaps extension: too many bitmaps", structure="header")
    if ext.nb_bitmaps == 0:
        raise CorruptImage("found bitmaps extension with zero bitmaps", structure="header")
    if ext.bitmap_directory_offset % h.cluster_size:
        raise CorruptImage("bitmaps extension: invalid directory offset", structure="header")
    if ext.bitmap_directory_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        raise CorruptImage("bitmaps extension: directory is too large", structure="header")


def _open_linked_files(path: str, h: Header) -> None:
    """qemu-img opens the backing chain and the data file too; fail as it would."""
    from qcowlib.disk._file import HostFile
    from qcowlib.disk.chain import BackingPolicy, resolve_linked_path
    from qcowlib.errors import BackingNotFound, QcowlibIOError
    from qcowlib.formats.opener import open_disk

    policy = BackingPolicy()
    if h.has_data_file and h.data_file is not None:
        name = resolve_linked_path(path, h.data_file, "external data file", policy)
        try:
            HostFile(name).close()
        except QcowlibError as exc:
            raise QcowlibIOError(
                f"cannot open external data file {name!r}: {exc.message}", file=path
            ) from None
    if h.backing_file is not None:
        name = resolve_linked_path(path, h.backing_file, "backing file", policy)
        try:
            open_disk(name, h.backing_format).close()
        except QcowlibIOError as exc:
            raise BackingNotFound(
                f"cannot open backing file {name!r}: {exc.message}", file=path
            ) from None


def _check_qcow2(host: HostFile, header: Header, path: str, fix: int) -> CheckReport:
    """img_check: one pass, and a second read-only one if the repair fixed something."""
    from qcowlib.disk.qcow2_repair import RepairWriter

    writer = RepairWriter(host) if fix else None
    messages = _Messages()
    try:
        first = _Qcow2Check(host, header, writer, messages)
        res = first.run(fix)
        repaired = bool(res.corruptions_fixed or res.leaks_fixed)
        if repaired:
            fixed = (res.corruptions_fixed, res.leaks_fixed)
            header = _read_header(host)
            second = _Qcow2Check(host, header, None, messages, signaled=first.signaled_corruption)
            res = second.run(0)
            res.corruptions_fixed, res.leaks_fixed = fixed
    except _CheckFailed as exc:
        return CheckReport(path, "qcow2", failure=exc.text, messages=messages.lines())
    finally:
        if writer is not None:
            writer.sync()
    return CheckReport(
        filename=path,
        format="qcow2",
        check_errors=res.check_errors,
        corruptions=res.corruptions,
        leaks=res.leaks,
        corruptions_fixed=res.corruptions_fixed,
        leaks_fixed=res.leaks_fixed,
        image_end_offset=res.image_end_offset,
        total_clusters=res.total_clusters,
        allocated_clusters=res.allocated_clusters,
        fragmented_clusters=res.fragmented_clusters,
        compressed_clusters=res.compressed_clusters,
        repaired=repaired,
        messages=messages.lines(),
    )


# --------------------------------------------------------------------------------------
# bookkeeping


@dataclass
class _Result:
    """QEMU's BdrvCheckResult (with its BlockFragInfo flattened in)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0

    def assign(self, other: _Result) -> None:
        """``*res = other``."""
        self.__dict__.update(other.__dict__)

    def add(self, src: _Result, allocation_info: bool) -> None:
        """qcow2_add_check_result."""
        self.corruptions += src.corruptions
        self.leaks += src.leaks
        self.check_errors += src.check_errors
        self.corruptions_fixed += src.corruptions_fixed
        self.leaks_fixed += src.leaks_fixed
        if allocation_info:
            self.image_end_offset = src.image_end_offset
            self.total_clusters = src.total_clusters
            self.allocated_clusters = src.allocated_clusters
            self.fragmented_clusters = src.fragmented_clusters
            self.compressed_clusters = src.compressed_clusters


class _CheckFailed(Exception):
    """The check could not complete (QEMU returns -errno); ``text`` is what qemu-img says."""

    def __init__(self, errno_text: str) -> None:
        super().__init__(errno_text)
        self.text = f"Check failed: {errno_text}"


class _Messages:
    """The stderr lines of a check, capped at :data:`MAX_MESSAGES`."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self.dropped = 0

    def add(self, line: str) -> None:
        if len(self._lines) < MAX_MESSAGES:
            self._lines.append(line)
        else:
            self.dropped += 1

    def drop(self, count: int) -> None:
        self.dropped += count

    def lines(self) -> tuple[str, ...]:
        out = tuple(self._lines)
        if self.dropped:
            out += (f"({self.dropped} further messages were not kept)",)
        return out


class _Imrt:
    """QEMU's in-memory refcount table: one refcount per host cluster, as computed
    from the metadata.  ``size`` is QEMU's ``nb_clusters`` (the number of entries in
    use); the array may be longer and is zero past ``size``."""

    def __init__(self, size: int, dtype: Any) -> None:
        import numpy as np

        self.dtype = dtype
        self.size = size
        self.counts: Counts = np.zeros(max(size, 1), dtype=dtype)

    def resize(self, size: int) -> None:
        """realloc_refcount_array: grow to ``size`` entries (new entries are zero)."""
        import numpy as np

        if size > self.counts.size:
            grown = np.zeros(max(size, self.counts.size * 3 // 2), dtype=self.dtype)
            grown[: self.counts.size] = self.counts
            self.counts = grown
        self.size = max(self.size, size)

    def view(self) -> Counts:
        return self.counts[: self.size]

    def clear(self) -> None:
        self.counts[:] = 0


@dataclass
class _L2Scan:
    """What check_refcounts_l2 found in one L2 table.

    ``refs`` are the referenced host clusters in QEMU's order; each message is keyed by
    the number of those references made before it was printed.
    """

    refs: I64
    msgs: list[tuple[int, str]] = field(default_factory=list)
    corruptions: int = 0
    corruptions_fixed: int = 0
    check_errors: int = 0
    allocated: int = 0
    compressed: int = 0
    fragmented: int = 0
    #: errno text when checking must stop (a metadata overlap while fixing).
    failure: str | None = None
    cacheable: bool = True


class _Recorder:
    """Counts references into an :class:`_Imrt` in QEMU's order, in bulk.

    Each batch of references (an L2 table's, a table's own clusters) is counted at once
    with ``np.bincount`` over the range it spans.  Only where each batch came from is
    kept, so that in the rare case of a refcount overflowing its maximum the overflow
    messages can be placed exactly where QEMU prints them.  :meth:`flush` saturates the
    counts at the maximum and emits all messages in QEMU's order.
    """

    #: Scattered references are buffered up to this many before counting.
    PENDING_MAX = 1 << 22

    def __init__(self, chk: _Qcow2Check, res: _Result, imrt: _Imrt) -> None:
        self.chk = chk
        self.res = res
        self.imrt = imrt
        #: (stream position of the first reference, the references themselves, the L2
        #: table offset they come from, or a function that produces them again)
        self.sources: list[tuple[int, I64 | int | Callable[[], I64]]] = []
        self.pending: list[tuple[I64, int]] = []
        self.pending_n = 0
        self.n = 0
        self.msgs: list[tuple[int, int, int, str]] = []  # (position, kind, seq, text)
        self.dropped = 0

    def msg(self, text: str, pos: int | None = None) -> None:
        if len(self.msgs) >= MAX_MESSAGES:
            self.dropped += 1
            return
        self.msgs.append((self.n if pos is None else pos, 0, len(self.msgs), text))

    def count(self, refs: I64, weight: int = 1) -> None:
        """Add ``weight`` to the IMRT entry of every cluster in ``refs``."""
        import numpy as np

        if refs.size == 0:
            return
        lo, hi = int(refs.min()), int(refs.max()) + 1
        self.imrt.resize(hi)
        if hi - lo <= 4 * refs.size + 4096:
            counts = np.bincount(refs - lo, minlength=hi - lo) * weight
            self.imrt.counts[lo:hi] += counts.astype(self.imrt.counts.dtype)
        else:
            self.pending.append((refs, weight))
            self.pending_n += int(refs.size)
            if self.pending_n >= self.PENDING_MAX:
                self._drain()

    def add(self, refs: I64, source: int | None = None) -> None:
        """Count ``refs`` as the next references; ``source`` is the L2 table offset
        they were derived from."""
        if refs.size == 0:
            return
        self.sources.append((self.n, refs if source is None else source))
        self.n += int(refs.size)
        self.count(refs)

    def add_stream(self, length: int, replay: Callable[[], I64]) -> None:
        """Account for ``length`` references already counted with :meth:`count`;
        ``replay`` produces them again, in order, should overflows need placing."""
        if length:
            self.sources.append((self.n, replay))
            self.n += length

    def _drain(self) -> None:
        import numpy as np

        if self.pending:
            refs = np.concatenate([r for r, _w in self.pending])
            weights = np.concatenate([np.full(r.size, w, np.int64) for r, w in self.pending])
            clusters, inverse = np.unique(refs, return_inverse=True)
            counts = np.bincount(inverse, weights=weights, minlength=clusters.size)
            self.imrt.counts[clusters] += np.rint(counts).astype(self.imrt.counts.dtype)
            self.pending.clear()
            self.pending_n = 0

    def add_scan(self, scan: _L2Scan, l2_offset: int) -> None:
        base = self.n
        for rel, text in scan.msgs:
            self.msg(text, base + rel)
        self.add(scan.refs, l2_offset)

    def inc(self, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt for one range."""
        import numpy as np

        if size <= 0:
            return
        if offset > INT64_MAX:  # an int64_t offset gone negative: QEMU fails to allocate
            self.res.check_errors += 1
            raise _CheckFailed(ENOMEM)
        cs = self.chk.cluster_size
        if offset + size - self.chk.host.size >= cs:
            self.msg(_eof_message(offset, size))
            self.res.corruptions += 1
            return
        cb = self.chk.cluster_bits
        first, last = offset >> cb, (offset + size - 1) >> cb
        self.add(np.arange(first, last + 1, dtype=np.int64))

    def flush(self) -> None:
        """Saturate the counts at the refcount maximum; emit messages in QEMU's order."""
        import numpy as np

        self._drain()
        rmax = self.chk.refcount_max
        counts = self.imrt.view()
        overflow: list[tuple[int, int, int, str]] = []
        if rmax < np.iinfo(counts.dtype).max:
            over = np.flatnonzero(counts > rmax)
            if over.size:
                self.res.corruptions += int((counts[over] - rmax).sum())
                overflow = self._overflow_messages(over, counts)
                counts[over] = rmax
        for _pos, _kind, _seq, text in sorted(self.msgs + overflow):
            self.chk.messages.add(text)
        self.chk.messages.drop(self.dropped)
        self.sources.clear()
        self.msgs.clear()
        self.dropped = 0

    def _overflow_messages(self, over: I64, counts: Counts) -> list[tuple[int, int, int, str]]:
        """One message pair per reference past the maximum, where QEMU prints it."""
        import numpy as np

        cs = self.chk.cluster_size
        rmax = self.chk.refcount_max
        hint = (
            "Use qemu-img amend to increase the refcount entry width or qemu-img convert "
            "to create a clean copy if the image cannot be opened for writing"
        )
        out: list[tuple[int, int, int, str]] = []
        limit = 2 * MAX_MESSAGES
        if self.n > EXACT_OVERFLOW_REFS:
            # Too many references to replay: report them after everything else.
            events = 0
            for c in over.tolist():
                excess = int(counts[c]) - rmax
                events += excess
                for _ in range(min(excess, (limit - len(out)) // 2)):
                    text = f"ERROR: overflow cluster offset={c * cs:#x}"
                    out.append((self.n, 1, len(out), text))
                    out.append((self.n, 1, len(out), hint))
            self.dropped += 2 * events - len(out)
            return out
        positions: list[I64] = []
        clusters: list[I64] = []
        for start, source in self.sources:
            if isinstance(source, int):
                refs = self.chk.rescan_refs(source)
            elif callable(source):
                refs = source()
            else:
                refs = source
            hit = np.flatnonzero(np.isin(refs, over))
            if hit.size:
                positions.append(hit.astype(np.int64) + start)
                clusters.append(refs[hit])
        pos_all = np.concatenate(positions)
        cl_all = np.concatenate(clusters)
        order = np.lexsort((pos_all, cl_all))
        pos_sorted, cl_sorted = pos_all[order], cl_all[order]
        rank = np.arange(cl_sorted.size) - np.searchsorted(cl_sorted, cl_sorted, side="left")
        sel = np.flatnonzero(rank >= rmax)
        sel = sel[np.argsort(pos_sorted[sel], kind="stable")]  # events in stream order
        keep_idx = sel[: limit // 2]
        self.dropped += 2 * (sel.size - keep_idx.size)
        for p, c in zip(pos_sorted[keep_idx].tolist(), cl_sorted[keep_idx].tolist(), strict=True):
            out.append((p, 1, len(out), f"ERROR: overflow cluster offset={c * cs:#x}"))
            out.append((p, 1, len(out), hint))
        return out


def _ranges(first: I64, count: I64) -> I64:
    """``first[i], first[i] + 1, ..., first[i] + count[i] - 1`` for each i, in order."""
    import numpy as np

    total = int(count.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(count)
    return np.repeat(first - (ends - count), count) + np.arange(total, dtype=np.int64)


def _eof_message(offset: int, size: int) -> str:
    return (
        "ERROR: counting reference for region exceeding the end of the file by one "
        f"cluster or more: offset 0x{offset:x} size 0x{size:x}"
    )


@dataclass(frozen=True)
class _Snapshot:
    """A snapshot table entry as QEMU keeps it in memory (QCowSnapshot)."""

    l1_table_offset: int
    l1_size: int
    id_raw: bytes
    name_raw: bytes
    extra_data_size: int
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    disk_size: int
    icount: int
    unknown_extra_data: bytes

    @property
    def id_str(self) -> str:
        return _cstr(self.id_raw)

    @property
    def name(self) -> str:
        return _cstr(self.name_raw)

    def encode(self) -> bytes:
        """The entry as qcow2_write_snapshots writes it (extra data at least 24 bytes;
        names up to their first NUL, as QEMU's strlen() sees them)."""
        ident = self.id_raw.split(b"\0", 1)[0]
        name = self.name_raw.split(b"\0", 1)[0]
        extra_size = max(SNAPSHOT_EXTRA_SIZE, self.extra_data_size)
        header = _snapshot.SNAPSHOT_HEADER.build(
            {
                "l1_table_offset": self.l1_table_offset,
                "l1_size": self.l1_size,
                "id_str_size": len(ident),
                "name_size": len(name),
                "date_sec": self.date_sec,
                "date_nsec": self.date_nsec,
                "vm_clock_nsec": self.vm_clock_nsec,
                "vm_state_size": self.vm_state_size if self.vm_state_size <= 0xFFFF_FFFF else 0,
                "extra_data_size": extra_size,
            }
        )
        extra = _snapshot.SNAPSHOT_EXTRA.build(
            {
                "vm_state_size_large": self.vm_state_size,
                "disk_size": self.disk_size,
                "icount": self.icount,
            }
        )
        return bytes(header + extra + self.unknown_extra_data + ident + name)


def _cstr(raw: bytes) -> str:
    """A C string as printf's %s shows it (up to the first NUL)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _ranges_overlap(a: int, a_len: int, b: int, b_len: int) -> bool:
    if a_len == 0 or b_len == 0:
        return False
    return not (b + b_len - 1 < a or a + a_len - 1 < b)


# --------------------------------------------------------------------------------------
# the checker


class _Qcow2Check:
    """One check pass over an open qcow2 file (QEMU's BDRVQcow2State, for checking)."""

    def __init__(
        self,
        host: HostFile,
        header: Header,
        writer: RepairWriter | None,
        messages: _Messages,
        *,
        signaled: bool = False,
    ) -> None:
        import numpy as np

        from qcowlib.formats.qcow2 import header as hdr
        from qcowlib.formats.qcow2.refcount import max_refcount
        from qcowlib.formats.qcow2.tables import CompressedLayout

        self.host = host
        self.h = header
        self.writer = writer
        self.messages = messages
        self.signaled_corruption = signaled
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.extended = header.extended_l2
        self.l2_entry_size = header.l2_entry_size
        self.l2_size = header.l2_size
        self.has_data_file = header.has_data_file
        self.refcount_order = header.refcount_order
        self.refcount_max = max_refcount(header.refcount_order)
        self.refcount_block_bits = self.cluster_bits + 3 - self.refcount_order
        self.refcount_block_size = 1 << self.refcount_block_bits
        # Stored refcounts are kept in the narrowest dtype that holds one.
        self.rc_dtype: Any = (
            (np.uint8, np.uint8, np.uint8, np.uint8, np.uint16, np.uint32)[self.refcount_order]
            if self.refcount_order < 6
            else np.uint64
        )
        # The IMRT counts past the maximum before saturating, so it is at least 32 bits.
        self.imrt_dtype: Any = np.uint64 if self.refcount_order == 6 else np.uint32
        self.compressed_layout = CompressedLayout(self.cluster_bits)
        self.incompatible_features = header.incompatible_features
        # Tables QEMU keeps in memory from open: the active L1 table and the reftable.
        self.l1_table: U64 = self._read_table(header.l1_table_offset, header.l1_size)
        self.refcount_table_offset = header.refcount_table_offset
        self.refcount_table: U64 = self._read_table(
            header.refcount_table_offset, header.refcount_table_clusters * self.cluster_size // 8
        )
        bitmaps = header.bitmaps
        if bitmaps is not None and header.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
            self.nb_bitmaps = bitmaps.nb_bitmaps
            self.bitmap_directory_offset = bitmaps.bitmap_directory_offset
            self.bitmap_directory_size = bitmaps.bitmap_directory_size
        else:
            self.nb_bitmaps = self.bitmap_directory_offset = self.bitmap_directory_size = 0
        crypto = header.crypto if header.crypt_method == hdr.CRYPT_LUKS else None
        self.crypto_offset = crypto.offset if crypto else 0
        self.crypto_length = crypto.length if crypto else 0
        self.snapshots: list[_Snapshot] = []
        self.snapshots_offset = 0
        self.snapshots_size = 0
        self._refblocks: dict[int, Counts] = {}
        self._dirty_refblocks: set[int] = set()
        self._l2_cache: dict[tuple[int, int, bool], _L2Scan] = {}
        self._l2_cached_entries = 0

    # -- reading --------------------------------------------------------------------------
    def _read_table(self, offset: int, entries: int) -> U64:
        """A table of big-endian 64-bit entries (zeros where it lies past EOF)."""
        import numpy as np

        table = np.zeros(max(entries, 0), dtype=np.uint64)
        inside = min(entries, max(0, self.host.size - offset) // 8)
        if inside > 0:
            raw = self.host.pread(offset, inside * 8)
            table[:inside] = np.frombuffer(raw, dtype=">u8")
        return table

    def _refblock(self, offset: int, *, keep: bool = True) -> Counts:
        """A refcount block's refcounts (a block past EOF reads as zeros)."""
        from qcowlib.formats.qcow2.refcount import decode_block

        block = self._refblocks.get(offset)
        if block is None:
            raw = self.host.pread(offset, self.cluster_size)
            block = decode_block(raw, self.refcount_order).astype(self.rc_dtype)
            if keep:
                if len(self._refblocks) >= REFBLOCK_CACHE_BLOCKS:
                    for k in [k for k in self._refblocks if k not in self._dirty_refblocks]:
                        del self._refblocks[k]
                self._refblocks[offset] = block
        return block

    def _refblock_offset(self, index: int, *, signal: bool = True) -> int | None:
        """The offset of refcount block ``index``; 0 for none; None when it cannot be
        read: unaligned (which QEMU signals as a corruption the first time) or past the
        largest offset QEMU's block layer reads."""
        if index >= self.refcount_table.size:
            return 0
        offset = int(self.refcount_table[index]) & REFT_OFFSET_MASK
        if offset & (self.cluster_size - 1):
            if signal:
                self._signal_corruption(
                    f"Refblock offset {offset:#x} unaligned (reftable index: {index:#x})"
                )
            return None
        if offset + self.cluster_size > BDRV_MAX_LENGTH:
            return None
        return offset

    def get_refcounts(self, clusters: U64, *, signal: bool = True) -> tuple[U64, Bools]:
        """qcow2_get_refcount for many clusters: values and a mask of failed lookups."""
        import numpy as np

        values = np.zeros(clusters.size, dtype=np.uint64)
        errors = np.zeros(clusters.size, dtype=bool)
        if clusters.size == 0:
            return values, errors
        mask = np.uint64(self.refcount_block_size - 1)
        block_index = clusters >> np.uint64(self.refcount_block_bits)
        first, last = int(block_index.min()), int(block_index.max())
        if first == last:  # the common case: one refcount block
            if first < self.refcount_table.size:
                offset = self._refblock_offset(first, signal=signal)
                if offset is None:
                    errors[:] = True
                elif offset:
                    values[:] = self._refblock(offset)[clusters & mask]
            return values, errors
        sel = np.flatnonzero(block_index < np.uint64(self.refcount_table.size))
        if sel.size == 0:
            return values, errors
        bidx = block_index[sel]
        order = np.argsort(bidx, kind="stable")
        sel, bidx = sel[order], bidx[order]
        uniq, starts = np.unique(bidx, return_index=True)
        ends = np.append(starts[1:], bidx.size)
        for b, s, e in zip(uniq.tolist(), starts.tolist(), ends.tolist(), strict=True):
            offset = self._refblock_offset(int(b), signal=signal)
            where = sel[s:e]
            if offset is None:
                errors[where] = True
            elif offset:
                block = self._refblock(offset)
                values[where] = block[clusters[where] & mask]
        return values, errors

    def stored_range(self, lo: int, hi: int) -> tuple[Counts, Bools | None]:
        """Stored refcounts of clusters ``[lo, hi)`` (``lo`` a multiple of the refcount
        block size) and a mask of failed lookups (unaligned refcount blocks)."""
        import numpy as np

        out = np.zeros(hi - lo, dtype=self.rc_dtype)
        errors: Bools | None = None
        rbs = self.refcount_block_size
        first = lo // rbs
        last = min(-(-hi // rbs), self.refcount_table.size)
        offsets = self.refcount_table[first:last] & np.uint64(REFT_OFFSET_MASK)
        for b in (np.flatnonzero(offsets) + first).tolist():
            start, end = max(lo, b * rbs), min(hi, (b + 1) * rbs)
            offset = self._refblock_offset(b, signal=False)
            if offset is None:
                if errors is None:
                    errors = np.zeros(hi - lo, dtype=bool)
                errors[start - lo : end - lo] = True
                continue
            block = self._refblock(offset, keep=offset in self._refblocks)
            out[start - lo : end - lo] = block[start - b * rbs : end - b * rbs]
        return out, errors

    # -- writing --------------------------------------------------------------------------
    def _signal_corruption(self, message: str) -> None:
        """qcow2_signal_corruption (fatal): print once; mark the image corrupt if writable."""
        from qcowlib.formats.qcow2.header import INCOMPAT_CORRUPT

        fatal = self.writer is not None
        if self.signaled_corruption and (
            not fatal or self.incompatible_features & INCOMPAT_CORRUPT
        ):
            return
        if fatal:
            self.messages.add(
                f"qcow2: Marking image as corrupt: {message}; further corruption events "
                "will be suppressed"
            )
            self._set_incompatible_features(self.incompatible_features | INCOMPAT_CORRUPT)
        else:
            self.messages.add(
                f"qcow2: Image is corrupt: {message}; further non-fatal corruption events "
                "will be suppressed"
            )
        self.signaled_corruption = True

    def _set_incompatible_features(self, features: int) -> None:
        if features == self.incompatible_features:
            return
        self.incompatible_features = features
        if self.h.version >= 3 and self.writer is not None:
            self.writer.write_incompatible_features(features)

    def _overlap(self, ign: int, offset: int, size: int) -> int:
        """qcow2_check_metadata_overlap in QEMU's default ("cached") mode."""
        import numpy as np

        chk = QCOW2_OL_CACHED & ~ign
        if not size:
            return 0
        cs = self.cluster_size
        if chk & QCOW2_OL_MAIN_HEADER and offset < cs:
            return QCOW2_OL_MAIN_HEADER
        size = -(-((offset & (cs - 1)) + size) // cs) * cs
        offset &= ~(cs - 1)
        h = self.h
        if (
            chk & QCOW2_OL_ACTIVE_L1
            and h.l1_size
            and _ranges_overlap(offset, size, h.l1_table_offset, h.l1_size * 8)
        ):
            return QCOW2_OL_ACTIVE_L1
        if chk & QCOW2_OL_REFCOUNT_TABLE and _ranges_overlap(
            offset, size, self.refcount_table_offset, self.refcount_table.size * 8
        ):
            return QCOW2_OL_REFCOUNT_TABLE
        if (
            chk & QCOW2_OL_SNAPSHOT_TABLE
            and self.snapshots_size
            and _ranges_overlap(offset, size, self.snapshots_offset, self.snapshots_size)
        ):
            return QCOW2_OL_SNAPSHOT_TABLE
        if chk & QCOW2_OL_INACTIVE_L1:
            for sn in self.snapshots:
                if sn.l1_size and _ranges_overlap(offset, size, sn.l1_table_offset, sn.l1_size * 8):
                    return QCOW2_OL_INACTIVE_L1
        if chk & QCOW2_OL_ACTIVE_L2 and self.l1_table.size:
            l2 = (self.l1_table & np.uint64(L1E_OFFSET_MASK)).astype(np.int64)
            hit = (l2 != 0) & (l2 < offset + size) & (offset < l2 + cs)
            if hit.any():
                return QCOW2_OL_ACTIVE_L2
        if chk & QCOW2_OL_REFCOUNT_BLOCK and self.refcount_table.size:
            rb = self.refcount_table & np.uint64(REFT_OFFSET_MASK)
            rb = rb[rb < np.uint64(2**62)].astype(np.int64)
            hit = (rb != 0) & (rb < offset + size) & (offset < rb + cs)
            if hit.any():
                return QCOW2_OL_REFCOUNT_BLOCK
        if (
            chk & QCOW2_OL_BITMAP_DIRECTORY
            and self.nb_bitmaps
            and _ranges_overlap(
                offset, size, self.bitmap_directory_offset, self.bitmap_directory_size
            )
        ):
            return QCOW2_OL_BITMAP_DIRECTORY
        return 0

    def _pre_write_overlap_check(self, ign: int, offset: int, size: int) -> bool:
        """qcow2_pre_write_overlap_check: False (after signalling) when writing would
        clobber metadata."""
        hit = self._overlap(ign, offset, size)
        if hit:
            self._signal_corruption(
                f"Preventing invalid write on metadata (overlaps with {_OL_NAMES[hit]})"
            )
            return False
        return True

    def _write(self, offset: int, data: bytes) -> None:
        assert self.writer is not None
        self.writer.pwrite(offset, data)

    def _update_refcount(self, cluster: int, value: int) -> None:
        """Set one cluster's stored refcount (its refcount block exists)."""
        index = cluster >> self.refcount_block_bits
        offset = self._refblock_offset(index)
        assert offset
        block = self._refblock(offset)
        block[cluster & (self.refcount_block_size - 1)] = value
        self._dirty_refblocks.add(offset)

    def _flush_refblocks(self) -> None:
        from qcowlib.formats.qcow2.refcount import encode_block

        for offset in sorted(self._dirty_refblocks):
            block = self._refblocks[offset]
            self._write(offset, encode_block(block.astype("u8"), self.refcount_order))
        self._dirty_refblocks.clear()

    # -- the check ------------------------------------------------------------------------
    def run(self, fix: int) -> _Result:
        """qcow2_co_check_locked.  Raises :class:`_CheckFailed` when QEMU returns an error."""
        from qcowlib.formats.qcow2.header import INCOMPAT_CORRUPT, INCOMPAT_DIRTY

        result = _Result()
        snapshot_res = _Result()
        try:
            self._check_read_snapshot_table(snapshot_res, fix)
        except _CheckFailed:
            result.add(snapshot_res, False)
            raise
        refcount_res = _Result()
        try:
            self._check_refcounts(refcount_res, fix)
        finally:
            result.add(refcount_res, True)
        self._check_fix_snapshot_table(snapshot_res, fix)
        result.add(snapshot_res, False)
        if fix and result.check_errors == 0 and result.corruptions == 0:
            self._set_incompatible_features(
                self.incompatible_features & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
            )
        return result

    def _check_read_snapshot_table(self, res: _Result, fix: int) -> None:
        """qcow2_check_read_snapshot_table and qcow2_do_read_snapshots."""
        repair = bool(fix & BDRV_FIX_ERRORS)
        nb_snapshots, offset = struct.unpack(">IQ", self.host.pread(60, 12))
        if (
            offset & (self.cluster_size - 1)
            or INT64_MAX - nb_snapshots * SNAPSHOT_HEADER_SIZE < offset
        ):
            res.check_errors += 1
            self.messages.add("ERROR snapshot table offset invalid")
            raise _CheckFailed(EINVAL)
        self.snapshots_offset = offset
        snapshots: list[_Snapshot] = []
        nb_clusters_reduced = 0
        extra_data_dropped = 0
        pos = offset
        table_length = 0
        for i in range(nb_snapshots):
            pre_sn_offset = pos
            table_length = (table_length + 7) & ~7
            pos = (pos + 7) & ~7
            h = _snapshot.SNAPSHOT_HEADER.parse(
                self.host.pread(pos, SNAPSHOT_HEADER_SIZE).ljust(SNAPSHOT_HEADER_SIZE, b"\0")
            )
            id_len, name_len, extra = h.id_str_size, h.name_size, h.extra_data_size
            pos += SNAPSHOT_HEADER_SIZE
            kept_extra = extra
            if extra > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
                if not repair:
                    res.check_errors += 1
                    self.messages.add(
                        "ERROR failed to read the snapshot table: Too much extra metadata "
                        f"in snapshot table entry {i}"
                    )
                    self.messages.add(
                        "You can force-remove this extra metadata with qemu-img check -r all"
                    )
                    raise _CheckFailed(EFBIG)
                self.messages.add(
                    f"Discarding too much extra metadata in snapshot table entry {i} "
                    f"({extra} > {QCOW_MAX_SNAPSHOT_EXTRA_DATA})"
                )
                extra_data_dropped += 1
                kept_extra = QCOW_MAX_SNAPSHOT_EXTRA_DATA
            known = _snapshot.SNAPSHOT_EXTRA.parse(
                self.host.pread(pos, min(SNAPSHOT_EXTRA_SIZE, extra)).ljust(
                    SNAPSHOT_EXTRA_SIZE, b"\0"
                )
            )
            unknown = (
                self.host.pread(pos + SNAPSHOT_EXTRA_SIZE, kept_extra - SNAPSHOT_EXTRA_SIZE)
                if kept_extra > SNAPSHOT_EXTRA_SIZE
                else b""
            )
            pos += extra
            names = self.host.pread(pos, id_len + name_len)
            pos += id_len + name_len
            snapshots.append(
                _Snapshot(
                    l1_table_offset=h.l1_table_offset,
                    l1_size=h.l1_size,
                    id_raw=names[:id_len],
                    name_raw=names[id_len:],
                    extra_data_size=kept_extra,
                    vm_state_size=known.vm_state_size_large if extra >= 8 else h.vm_state_size,
                    date_sec=h.date_sec,
                    date_nsec=h.date_nsec,
                    vm_clock_nsec=h.vm_clock_nsec,
                    disk_size=known.disk_size if extra >= 16 else -(-self.h.size // 512) * 512,
                    icount=known.icount if extra >= 24 else 2**64 - 1,
                    unknown_extra_data=unknown,
                )
            )
            table_length += SNAPSHOT_HEADER_SIZE + kept_extra + id_len + name_len
            if table_length > QCOW_MAX_SNAPSHOTS_SIZE or pos - offset > INT_MAX:
                if not repair:
                    res.check_errors += 1
                    self.messages.add(
                        "ERROR failed to read the snapshot table: Snapshot table is too big"
                    )
                    self.messages.add(
                        f"You can force-remove all {nb_snapshots - i} overhanging snapshots "
                        "with qemu-img check -r all"
                    )
                    raise _CheckFailed(EFBIG)
                self.messages.add(
                    f"Discarding {nb_snapshots - i} overhanging snapshots (snapshot table is "
                    "too big)"
                )
                nb_clusters_reduced += nb_snapshots - i
                snapshots.pop()
                pos = pre_sn_offset
                break
        self.snapshots = snapshots
        self.snapshots_size = pos - offset if nb_snapshots else 0
        res.corruptions += nb_clusters_reduced + extra_data_dropped
        if nb_clusters_reduced:
            # The header must agree before the refcounts are checked; the snapshots
            # dropped leak their clusters, which the refcount check then frees.
            assert self.writer is not None
            self.writer.pwrite(60, struct.pack(">I", len(snapshots)))
            res.corruptions_fixed += nb_clusters_reduced
            res.corruptions -= nb_clusters_reduced
        if self.h.version >= 3:
            for i, sn in enumerate(snapshots):
                if sn.extra_data_size < 16:
                    res.corruptions += 1
                    word = "Repairing" if repair else "ERROR"
                    self.messages.add(f"{word} snapshot table entry {i} is incomplete")

    def _check_fix_snapshot_table(self, res: _Result, fix: int) -> None:
        """qcow2_check_fix_snapshot_table: rewrite the table (qcow2_write_snapshots)."""
        if not (res.corruptions and fix & BDRV_FIX_ERRORS):
            return
        table = bytearray()
        for sn in self.snapshots:
            table += bytes(-len(table) % 8)
            table += sn.encode()
            if len(table) > QCOW_MAX_SNAPSHOTS_SIZE:
                res.check_errors += 1
                self.messages.add(f"ERROR failed to update snapshot table: {EFBIG}")
                raise _CheckFailed(EFBIG)
        offset = self._alloc_clusters(len(table))
        if offset is None:
            return  # would need a new refcount block: leave the table as it is
        if not self._pre_write_overlap_check(0, offset, len(table)):
            res.check_errors += 1
            self.messages.add(f"ERROR failed to update snapshot table: {EIO}")
            raise _CheckFailed(EIO)
        self._write(offset, bytes(table))
        assert self.writer is not None
        self.writer.pwrite(60, struct.pack(">IQ", len(self.snapshots), offset))
        old_offset, old_size = self.snapshots_offset, self.snapshots_size
        self.snapshots_offset, self.snapshots_size = offset, len(table)
        self._free_clusters(old_offset, old_size)
        res.corruptions_fixed += res.corruptions
        res.corruptions = 0

    def _alloc_clusters(self, size: int) -> int | None:
        """qcow2_alloc_clusters, first fit on the stored refcounts from cluster 0.

        Returns None (allocating nothing) when the clusters found have no refcount
        block yet: creating one is not something a check needs to do.
        """
        import numpy as np

        if size <= 0:
            return None
        count = -(-size // self.cluster_size)
        rbs = self.refcount_block_size
        window = -(-max(1 << 16, count) // rbs) * rbs
        lo = 0
        carried = 0  # free clusters just before ``lo``
        while True:
            stored, errors = self.stored_range(lo, lo + window)
            free = stored == 0
            if errors is not None:
                free &= ~errors
            ext = np.concatenate((np.ones(carried, dtype=bool), free))
            runs = np.convolve(ext.astype(np.int64), np.ones(count, dtype=np.int64), "valid")
            hits = np.flatnonzero(runs == count)
            if hits.size:
                start = lo - carried + int(hits[0])
                break
            busy = np.flatnonzero(~ext)
            carried = min(count - 1, ext.size - 1 - int(busy[-1]) if busy.size else ext.size)
            lo += window
        clusters = range(start, start + count)
        if any(not self._refblock_offset(c >> self.refcount_block_bits) for c in clusters):
            return None
        for c in clusters:
            self._update_refcount(c, 1)
        self._flush_refblocks()
        return start * self.cluster_size

    def _free_clusters(self, offset: int, size: int) -> None:
        """qcow2_free_clusters: drop one reference from each cluster of the range."""
        import numpy as np

        if size <= 0:
            return
        cb = self.cluster_bits
        clusters = np.arange(offset >> cb, ((offset + size - 1) >> cb) + 1, dtype=np.uint64)
        values, errors = self.get_refcounts(clusters)
        for c, v, bad in zip(clusters.tolist(), values.tolist(), errors.tolist(), strict=True):
            if not bad and v:
                self._update_refcount(c, v - 1)
        self._flush_refblocks()

    def _check_refcounts(self, res: _Result, fix: int) -> None:
        """qcow2_check_refcounts."""
        cs = self.cluster_size
        nb_clusters = -(-self.host.size // cs)
        if nb_clusters > min(INT_MAX, MAX_CHECK_CLUSTERS):
            res.check_errors += 1
            raise _CheckFailed(EFBIG)
        res.total_clusters = -(-(-(-self.h.size // 512) * 512) // cs)
        imrt = _Imrt(nb_clusters, self.imrt_dtype)
        rebuild = self._calculate_refcounts(res, fix, imrt)
        pre_compare_res = copy.copy(res)
        rebuild_cmp, highest = self._compare_refcounts(res, 0, imrt)
        rebuild = rebuild or rebuild_cmp
        if rebuild and fix & BDRV_FIX_ERRORS:
            old_res = copy.copy(res)
            fresh_leaks = 0
            self.messages.add("Rebuilding refcount structure")
            self._rebuild_refcount_structure(res, imrt)
            res.corruptions = 0
            res.leaks = 0
            imrt.clear()
            rebuild = self._calculate_refcounts(res, 0, imrt)
            if fix & BDRV_FIX_LEAKS:
                saved_res = copy.copy(res)
                res.assign(_Result())
                rebuild_cmp, highest = self._compare_refcounts(res, BDRV_FIX_LEAKS, imrt)
                rebuild = rebuild or rebuild_cmp
                if rebuild:
                    self.messages.add("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = res.leaks
                res.assign(saved_res)
            if res.corruptions < old_res.corruptions:
                res.corruptions_fixed += old_res.corruptions - res.corruptions
            if res.leaks < old_res.leaks:
                res.leaks_fixed += old_res.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if rebuild:
                self.messages.add("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _CheckFailed(EIO)
            if res.leaks or res.corruptions:
                res.assign(pre_compare_res)
                _rebuild, highest = self._compare_refcounts(res, fix, imrt)
        self._check_oflag_copied(res, fix)
        res.image_end_offset = (highest + 1) * cs

    # -- calculate_refcounts ----------------------------------------------------------------
    def _calculate_refcounts(self, res: _Result, fix: int, imrt: _Imrt) -> bool:
        """calculate_refcounts: fill ``imrt``; returns whether a rebuild is needed."""
        rec = _Recorder(self, res, imrt)
        h = self.h
        try:
            rec.inc(0, self.cluster_size)
            self._check_refcounts_l1(
                rec, res, h.l1_table_offset, h.l1_size, frag=True, fix=fix, active=True
            )
            if self.has_data_file and self.snapshots:
                rec.msg(f"ERROR {len(self.snapshots)} snapshots in image with data file")
                res.corruptions += 1
            for sn in self.snapshots:
                if sn.l1_table_offset & (self.cluster_size - 1):
                    rec.msg(
                        f"ERROR snapshot {sn.id_str} ({sn.name}) "
                        f"l1_offset={_alt_hex(sn.l1_table_offset)}: L1 table is not cluster "
                        "aligned; snapshot table entry corrupted"
                    )
                    res.corruptions += 1
                    continue
                if sn.l1_size > QCOW_MAX_L1_SIZE // 8:
                    rec.msg(
                        f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={_alt_hex(sn.l1_size)}: "
                        "L1 table is too large; snapshot table entry corrupted"
                    )
                    res.corruptions += 1
                    continue
                self._check_refcounts_l1(
                    rec, res, sn.l1_table_offset, sn.l1_size, frag=False, fix=fix, active=False
                )
            rec.inc(self.snapshots_offset, self.snapshots_size)
            rec.inc(self.refcount_table_offset, self.refcount_table.size * 8)
            if self.crypto_length:
                rec.inc(self.crypto_offset, self.crypto_length)
            self._check_bitmaps_refcounts(rec, res)
        finally:
            rec.flush()
        return self._check_refblocks(res, fix, imrt)

    def _check_refcounts_l1(
        self,
        rec: _Recorder,
        res: _Result,
        l1_offset: int,
        l1_size: int,
        *,
        frag: bool,
        fix: int,
        active: bool,
    ) -> None:
        """check_refcounts_l1: the L1 table, its L2 tables and what they reference."""
        import numpy as np

        if not l1_size:
            return
        cs = self.cluster_size
        rec.inc(l1_offset, l1_size * 8)
        if l1_offset + l1_size * 8 > BDRV_MAX_LENGTH:
            rec.msg("ERROR: I/O error in check_refcounts_l1")
            res.check_errors += 1
            raise _CheckFailed(EIO)
        l1 = self._read_table(l1_offset, l1_size)
        if not fix & BDRV_FIX_ERRORS:
            self._check_l1_entries_bulk(rec, res, l1, frag=frag, active=active)
            return
        # Fixing: a table fixed on one visit reads differently on the next, so go in order.
        for i in np.flatnonzero(l1).tolist():
            entry = int(l1[i])
            if entry & L1E_RESERVED_MASK:
                rec.msg(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            l2_offset = entry & L1E_OFFSET_MASK
            rec.inc(l2_offset, cs)
            if l2_offset & (cs - 1):
                rec.msg(
                    f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                    "L1 entry corrupted"
                )
                res.corruptions += 1
            scan = self._scan_l2(l2_offset, fix, active)
            rec.add_scan(scan, l2_offset)
            res.corruptions += scan.corruptions
            res.corruptions_fixed += scan.corruptions_fixed
            res.check_errors += scan.check_errors
            if frag:
                res.allocated_clusters += scan.allocated
                res.compressed_clusters += scan.compressed
                res.fragmented_clusters += scan.fragmented
            if scan.failure is not None:
                raise _CheckFailed(scan.failure)

    def _check_l1_entries_bulk(
        self, rec: _Recorder, res: _Result, l1: U64, *, frag: bool, active: bool
    ) -> None:
        """The loop of check_refcounts_l1 over all entries at once (no fixes): each
        distinct L2 table is scanned once and its references counted once per L1 entry
        using it; message positions in QEMU's order come from a cumulative sum."""
        import numpy as np

        u = np.uint64
        cs, cb = self.cluster_size, self.cluster_bits
        idx = np.flatnonzero(l1)
        if idx.size == 0:
            return
        entries = l1[idx]
        l2 = (entries & u(L1E_OFFSET_MASK)).astype(np.int64)
        reserved = (entries & u(L1E_RESERVED_MASK)) != 0
        unaligned = (l2 & (cs - 1)) != 0
        eof = l2 >= self.host.size  # inc_refcounts(l2_offset, cluster_size) refuses it
        first = l2 >> cb
        own = np.where(eof, 0, ((l2 + cs - 1) >> cb) - first + 1)  # the table's clusters
        tables, which, uses = np.unique(l2, return_inverse=True, return_counts=True)
        sizes = np.zeros(tables.size, dtype=np.int64)
        table_msgs: list[list[tuple[int, str]]] = []
        for j, offset in enumerate(tables.tolist()):
            scan = self._scan_l2(offset, 0, active)
            times = int(uses[j])
            rec.count(scan.refs, times)
            sizes[j] = scan.refs.size
            table_msgs.append(scan.msgs)
            res.corruptions += scan.corruptions * times
            res.check_errors += scan.check_errors * times
            if frag:
                res.allocated_clusters += scan.allocated * times
                res.compressed_clusters += scan.compressed * times
                res.fragmented_clusters += scan.fragmented * times
        rec.count(_ranges(first[~eof], own[~eof]))
        res.corruptions += int(reserved.sum() + eof.sum() + unaligned.sum())
        per_entry = own + sizes[which]
        start = rec.n + np.cumsum(per_entry) - per_entry
        has_msgs = reserved | eof | unaligned | (np.array([bool(m) for m in table_msgs])[which])
        for i in np.flatnonzero(has_msgs).tolist():
            pos, entry, offset = int(start[i]), int(entries[i]), int(l2[i])
            after = pos + int(own[i])
            if reserved[i]:
                rec.msg(f"ERROR found L1 entry with reserved bits set: {entry:x}", pos)
            if eof[i]:
                rec.msg(_eof_message(offset, cs), pos)
            if unaligned[i]:
                rec.msg(
                    f"ERROR l2_offset={offset:x}: Table is not cluster aligned; L1 entry corrupted",
                    after,
                )
            for rel, text in table_msgs[int(which[i])]:
                rec.msg(text, after + rel)

        def replay() -> I64:
            parts: list[I64] = []
            memo: dict[int, I64] = {}
            for i in range(l2.size):
                if not eof[i]:
                    parts.append(np.arange(first[i], first[i] + own[i], dtype=np.int64))
                offset = int(l2[i])
                if offset not in memo:
                    memo[offset] = self.rescan_refs(offset)
                parts.append(memo[offset])
            return np.concatenate(parts)

        rec.add_stream(int(per_entry.sum()), replay)

    def _scan_l2(self, l2_offset: int, fix: int, active: bool) -> _L2Scan:
        """check_refcounts_l2 over one whole table at once."""
        import numpy as np

        file_len = self.host.size
        fixing = bool(fix & BDRV_FIX_ERRORS)
        key = (l2_offset, file_len, fixing)
        cached = self._l2_cache.get(key)
        if cached is not None:
            return cached
        empty = _L2Scan(refs=np.zeros(0, dtype=np.int64))
        if l2_offset >= file_len:
            return empty
        raw = np.frombuffer(self.host.pread(l2_offset, self.cluster_size), dtype=">u8")
        if not raw.any():
            return empty
        scan = self._scan_l2_entries(raw.astype(np.uint64), l2_offset, file_len, fixing, active)
        # Snapshot L1 tables share most L2 tables with the active one: remember scans.
        if (
            self.snapshots
            and scan.cacheable
            and self._l2_cached_entries + scan.refs.size <= L2_CACHE_ENTRIES
        ):
            self._l2_cache[key] = scan
            self._l2_cached_entries += max(1, int(scan.refs.size))
        return scan

    def rescan_refs(self, l2_offset: int) -> I64:
        """The references an L2 table makes (read again; fixed entries make none)."""
        import numpy as np

        raw = np.frombuffer(self.host.pread(l2_offset, self.cluster_size), dtype=">u8")
        table = raw.astype(np.uint64)
        return self._scan_l2_entries(table, l2_offset, self.host.size, False, True).refs

    def _scan_l2_entries(
        self, table: U64, l2_offset: int, file_len: int, fixing: bool, active: bool
    ) -> _L2Scan:
        import numpy as np

        cs = self.cluster_size
        cb = self.cluster_bits
        u = np.uint64
        if not self.extended and not self.has_data_file:
            # Fast path: only aligned standard and zero clusters inside the file.
            unusual = L2E_STD_RESERVED_MASK | QCOW_OFLAG_COMPRESSED | ((cs - 1) & ~0x1FF)
            if not (table & u(unusual)).any():
                off = table & u(L2E_OFFSET_MASK)
                offs = off[off != 0]
                if offs.size == 0 or int(offs.max()) < file_len:
                    return _L2Scan(
                        refs=(offs >> u(cb)).astype(np.int64),
                        allocated=int(offs.size),
                        fragmented=int(np.count_nonzero(offs[1:] != offs[:-1] + u(cs))),
                    )
        if self.extended:
            entries, bitmaps = table[0::2], table[1::2]
        else:
            entries, bitmaps = table, np.zeros(table.size, dtype=np.uint64)
        n = entries.size
        compressed = (entries & u(QCOW_OFLAG_COMPRESSED)) != 0
        noncomp = ~compressed
        copied = (entries & u(QCOW_OFLAG_COPIED)) != 0
        off = entries & u(L2E_OFFSET_MASK)
        has_off = off != 0
        if self.extended:
            zflag = np.zeros(n, dtype=bool)
        else:
            zflag = (entries & u(QCOW_OFLAG_ZERO)) != 0
        plain = noncomp & ~zflag
        normal = plain & (has_off | copied) if self.has_data_file else plain & has_off
        allocated = normal | (noncomp & zflag & has_off)  # NORMAL or ZERO_ALLOC
        unallocated = plain & ~normal
        reserved = noncomp & ((entries & u(L2E_STD_RESERVED_MASK)) != 0)
        comp_copied = compressed & copied
        if self.has_data_file:
            comp_datafile = compressed
            comp_bitmap = np.zeros(n, dtype=bool)
        else:
            comp_datafile = np.zeros(n, dtype=bool)
            comp_bitmap = compressed & (bitmaps != 0)
        comp_ok = compressed & ~comp_datafile & ~comp_bitmap
        bad_bitmap = allocated & (((bitmaps >> u(32)) & bitmaps) != 0)
        unaligned = allocated & ((off & u(cs - 1)) != 0)
        if self.extended:
            contains_data = (bitmaps & u(QCOW_L2_BITMAP_ALL_ALLOC)) != 0
        else:
            contains_data = ~zflag
        prealloc_unaligned = unaligned & ~contains_data
        unalloc_bad = unallocated & ((bitmaps & u(QCOW_L2_BITMAP_ALL_ALLOC)) != 0)

        scan = _L2Scan(refs=np.zeros(0, dtype=np.int64))
        # -r all turns misaligned preallocated zero clusters into plain zero clusters.
        fixed = np.zeros(n, dtype=bool)
        limit = n  # entries past a failed fix are not checked (QEMU aborts the table)
        fix_msgs: dict[int, list[str]] = {}
        if fixing and prealloc_unaligned.any():
            scan.cacheable = False
            for i in np.flatnonzero(prealloc_unaligned).tolist():
                ok, lines = self._fix_l2_entry_by_zero(table, l2_offset, i, active)
                fix_msgs[i] = lines
                if ok is None:
                    scan.check_errors += 1
                    scan.failure = EIO
                    limit = i
                    break
                if ok:
                    fixed[i] = True
                    scan.corruptions_fixed += 1
                else:
                    scan.check_errors += 1
        live = np.zeros(n, dtype=bool)
        live[:limit] = True
        allocated_live = allocated & ~fixed & live

        # The ranges counted into the IMRT, one per entry at most.
        start = np.zeros(n, dtype=np.int64)
        size = np.zeros(n, dtype=np.int64)
        if comp_ok.any():
            c_off, c_len = self.compressed_layout.decode(entries[comp_ok])
            start[comp_ok] = c_off.astype(np.int64)
            size[comp_ok] = c_len.astype(np.int64)
        refable = comp_ok.copy()
        if not self.has_data_file:
            start[allocated] = off[allocated].astype(np.int64)
            size[allocated] = cs
            refable |= allocated & ~fixed
        refable &= live
        eof = refable & (start + size - file_len >= cs)
        counted = refable & ~eof
        first = start >> cb
        count = np.where(counted, ((start + size - 1) >> cb) - first + 1, 0)
        scan.refs = _ranges(first[counted], count[counted])
        refstart = np.cumsum(count) - count  # references made before each entry's

        comp_live = comp_ok & live
        scan.allocated = int(comp_live.sum()) + int(allocated_live.sum())
        scan.compressed = int(comp_live.sum())
        normal_offs = off[allocated_live]
        scan.fragmented = int(comp_live.sum()) + int(
            np.count_nonzero(normal_offs[1:] != normal_offs[:-1] + u(cs))
        )
        problems = (
            reserved
            | comp_copied
            | comp_datafile
            | comp_bitmap
            | bad_bitmap
            | unaligned
            | unalloc_bad
            | eof
        )
        problems[limit + 1 :] = False
        for i in np.flatnonzero(problems).tolist():
            pos = int(refstart[i])
            entry = int(entries[i])
            say = scan.msgs.append
            if reserved[i]:
                say((pos, f"ERROR found l2 entry with reserved bits set: {entry:x}"))
                scan.corruptions += 1
            if compressed[i]:
                if comp_copied[i]:
                    coffset = entry & self.compressed_layout.offset_mask
                    say(
                        (
                            pos,
                            f"ERROR: coffset=0x{coffset:x}: copied flag must never be set "
                            "for compressed clusters",
                        )
                    )
                    entry &= ~QCOW_OFLAG_COPIED
                    scan.corruptions += 1
                if comp_datafile[i]:
                    say((pos, f"ERROR compressed cluster {i} with data file, entry=0x{entry:x}"))
                    scan.corruptions += 1
                elif comp_bitmap[i]:
                    say(
                        (
                            pos,
                            f"ERROR compressed cluster {i} with non-zero subcluster "
                            f"allocation bitmap, entry=0x{entry:x}",
                        )
                    )
                    scan.corruptions += 1
            elif allocated[i]:
                offset = int(off[i])
                if bad_bitmap[i]:
                    say(
                        (
                            pos,
                            f"ERROR offset={offset:x}: Allocated cluster has corrupted "
                            "subcluster allocation bitmap",
                        )
                    )
                    scan.corruptions += 1
                if unaligned[i]:
                    scan.corruptions += 1
                    if prealloc_unaligned[i]:
                        word = "Repairing" if fixing else "ERROR"
                        say(
                            (
                                pos,
                                f"{word} offset={offset:x}: Preallocated cluster is not "
                                "properly aligned; L2 entry corrupted.",
                            )
                        )
                        for line in fix_msgs.get(i, ()):
                            say((pos, line))
                        if fixed[i]:
                            scan.corruptions -= 1
                    else:
                        say(
                            (
                                pos,
                                f"ERROR offset={offset:x}: Data cluster is not properly "
                                "aligned; L2 entry corrupted.",
                            )
                        )
            elif unalloc_bad[i]:
                say((pos, "ERROR: Unallocated cluster has non-zero subcluster allocation map"))
                scan.corruptions += 1
            if eof[i]:
                say((pos, _eof_message(int(start[i]), int(size[i]))))
                scan.corruptions += 1
        return scan

    def _fix_l2_entry_by_zero(
        self, table: U64, l2_offset: int, index: int, active: bool
    ) -> tuple[bool | None, list[str]]:
        """fix_l2_entry_by_zero: True fixed, False write failed, None metadata overlap."""
        esize = self.l2_entry_size
        if self.extended:
            bitmap = int(table[2 * index + 1])
            bitmap = (bitmap | (bitmap << 32)) & QCOW_L2_BITMAP_ALL_ZEROES
            data = struct.pack(">QQ", 0, bitmap)
        else:
            data = struct.pack(">Q", QCOW_OFLAG_ZERO)
        where = l2_offset + index * esize
        ign = QCOW2_OL_ACTIVE_L2 if active else QCOW2_OL_INACTIVE_L2
        if not self._pre_write_overlap_check(ign, where, esize):
            return None, ["ERROR: Overlap check failed"]
        try:
            self._write(where, data)
        except QcowlibError as exc:
            return False, [f"ERROR: Failed to overwrite L2 table entry: {exc.message}"]
        return True, []

    def _check_bitmaps_refcounts(self, rec: _Recorder, res: _Result) -> None:
        """qcow2_check_bitmaps_refcounts."""
        import numpy as np

        if not self.nb_bitmaps:
            return
        rec.inc(self.bitmap_directory_offset, self.bitmap_directory_size)
        bitmaps = self._bitmap_list_load()
        if bitmaps is None:
            res.corruptions += 1
            raise _CheckFailed(EINVAL)
        cs = self.cluster_size
        for table_offset, table_size in bitmaps:
            rec.inc(table_offset, table_size * 8)
            if table_offset + table_size * 8 > BDRV_MAX_LENGTH:  # bitmap_table_load fails
                res.corruptions += 1
                raise _CheckFailed(EIO)
            table = self._read_table(table_offset, table_size)
            offsets = table & np.uint64(BME_TABLE_ENTRY_OFFSET_MASK)
            bad = (table & np.uint64(BME_TABLE_ENTRY_RESERVED_MASK)) != 0
            bad |= (offsets != 0) & (
                ((table & np.uint64(BME_TABLE_ENTRY_FLAG_ALL_ONES)) != 0)
                | ((offsets & np.uint64(cs - 1)) != 0)
            )
            if bad.any():  # bitmap_table_load fails
                res.corruptions += 1
                raise _CheckFailed(EINVAL)
            for offset in offsets[offsets != 0].tolist():
                rec.inc(int(offset), cs)

    def _bitmap_list_load(self) -> list[tuple[int, int]] | None:
        """bitmap_list_load and check_dir_entry: (table offset, size) per bitmap."""
        size = self.bitmap_directory_size
        if size == 0 or size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
            return None
        data = self.host.pread(self.bitmap_directory_offset, size)
        cs = self.cluster_size
        out: list[tuple[int, int]] = []
        pos = 0
        while pos < size:
            if pos + _bitmap.BITMAP_DIR_ENTRY_SIZE > size or len(out) + 1 > self.nb_bitmaps:
                return None
            e = _bitmap.BITMAP_DIR_ENTRY.parse(data[pos : pos + _bitmap.BITMAP_DIR_ENTRY_SIZE])
            t_off, t_size, flags, btype = (
                e.bitmap_table_offset,
                e.bitmap_table_size,
                e.flags,
                e.type,
            )
            gbits, name_size, extra = e.granularity_bits, e.name_size, e.extra_data_size
            entry_size = (_bitmap.BITMAP_DIR_ENTRY_SIZE + name_size + extra + 7) & ~7
            if pos + entry_size > size or extra != 0:
                return None
            if (
                t_size == 0
                or t_off == 0
                or t_off % cs
                or t_size > BME_MAX_TABLE_SIZE
                or gbits > BME_MAX_GRANULARITY_BITS
                or gbits < BME_MIN_GRANULARITY_BITS
                or flags & BME_RESERVED_FLAGS
                or name_size > BME_MAX_NAME_SIZE
                or btype != BT_DIRTY_TRACKING_BITMAP
            ):
                return None
            phys = t_size * cs
            if phys > BME_MAX_PHYS_SIZE or self.h.size > (phys * 8) << gbits:
                return None
            out.append((t_off, t_size))
            pos += entry_size
        if len(out) != self.nb_bitmaps:
            return None
        return out

    def _check_refblocks(self, res: _Result, fix: int, imrt: _Imrt) -> bool:
        """check_refblocks: account for each refcount block; returns ``rebuild``."""
        import numpy as np

        rebuild = False
        cs = self.cluster_size
        for i in np.flatnonzero(self.refcount_table).tolist():
            entry = int(self.refcount_table[i])
            offset = entry & REFT_OFFSET_MASK
            cluster = offset >> self.cluster_bits
            if entry & REFT_RESERVED_MASK:
                self.messages.add(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            if offset & (cs - 1):
                self.messages.add(
                    f"ERROR refcount block {i} is not cluster aligned; refcount table entry "
                    "corrupted"
                )
                res.corruptions += 1
                rebuild = True
                continue
            if cluster >= imrt.size:
                res.corruptions += 1
                fixing = bool(fix & BDRV_FIX_ERRORS)
                self.messages.add(
                    f"{'Repairing' if fixing else 'ERROR'} refcount block {i} is outside image"
                )
                if fixing:
                    error = self._grow_for_refblock(offset, imrt)
                    if error is None:
                        res.corruptions -= 1
                        res.corruptions_fixed += 1
                        self._inc_now(res, imrt, offset, cs)
                        continue
                    rebuild = True
                    self.messages.add(f"ERROR could not resize image: {error}")
                continue
            if offset:
                self._inc_now(res, imrt, offset, cs)
                value = int(imrt.counts[cluster])
                if value != 1:
                    self.messages.add(f"ERROR refcount block {i} refcount={value}")
                    res.corruptions += 1
                    rebuild = True
        return rebuild

    def _grow_for_refblock(self, offset: int, imrt: _Imrt) -> str | None:
        """Extend the file so a refcount block past its end lies inside it (as QEMU's
        check_refblocks does); returns the errno text when that is impossible."""
        from qcowlib.disk.qcow2_repair import ResizeFailed

        assert self.writer is not None
        cs = self.cluster_size
        if offset > INT64_MAX - cs:
            return EINVAL
        new_size = offset + cs
        if new_size - self.host.size > MAX_REPAIR_GROWTH or -(-new_size // cs) > MAX_CHECK_CLUSTERS:
            # Refuse as a file system would; the refcount structure is rebuilt instead.
            self.messages.add(f"Could not resize file: {EFBIG}")
            return EFBIG
        try:
            self.writer.grow(new_size)
        except ResizeFailed as exc:
            self.messages.add(exc.message)
            return exc.reason
        imrt.resize(-(-self.host.size // cs))
        return None

    def _inc_now(self, res: _Result, imrt: _Imrt, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt applied directly (few references, in order)."""
        cs = self.cluster_size
        if size <= 0:
            return
        if offset + size - self.host.size >= cs:
            self.messages.add(_eof_message(offset, size))
            res.corruptions += 1
            return
        first, last = offset >> self.cluster_bits, (offset + size - 1) >> self.cluster_bits
        imrt.resize(last + 1)
        for k in range(first, last + 1):
            if int(imrt.counts[k]) == self.refcount_max:
                self.messages.add(f"ERROR: overflow cluster offset={k * cs:#x}")
                self.messages.add(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img "
                    "convert to create a clean copy if the image cannot be opened for writing"
                )
                res.corruptions += 1
                continue
            imrt.counts[k] += 1

    # -- compare_refcounts ----------------------------------------------------------------
    def _compare_refcounts(self, res: _Result, fix: int, imrt: _Imrt) -> tuple[bool, int]:
        """compare_refcounts: returns ``(rebuild, highest_cluster)``.

        Works through the clusters in windows of whole refcount blocks, so memory stays
        bounded by the IMRT itself.
        """
        import numpy as np

        n = imrt.size
        rbs = self.refcount_block_size
        window = max(rbs, COMPARE_WINDOW // rbs * rbs)
        highest = 0
        rebuild = False
        freed: list[int] = []
        for lo in range(0, n, window):
            hi = min(n, lo + window)
            stored, errors = self.stored_range(lo, hi)
            computed = imrt.counts[lo:hi]
            used = (stored != 0) | (computed != 0)
            mismatch = stored != computed
            if errors is not None:
                used &= ~errors
                mismatch &= ~errors
            nz = np.flatnonzero(used)
            if nz.size:
                highest = lo + int(nz[-1])
            events = np.flatnonzero(mismatch)
            if errors is not None:
                events = np.union1d(events, np.flatnonzero(errors))
            for j in events.tolist():
                i = lo + j
                if errors is not None and errors[j]:
                    self._refblock_offset(i >> self.refcount_block_bits)  # signals once
                    self.messages.add(f"Can't get refcount for cluster {i}: {EIO}")
                    res.check_errors += 1
                    continue
                r1, r2 = int(stored[j]), int(computed[j])
                num_fixed: str | None = None
                if r1 == 0:
                    rebuild = True
                elif r1 > r2 and fix & BDRV_FIX_LEAKS:
                    num_fixed = "leaks_fixed"
                elif r1 < r2 and fix & BDRV_FIX_ERRORS:
                    num_fixed = "corruptions_fixed"
                word = "Repairing" if num_fixed else ("ERROR" if r1 < r2 else "Leaked")
                self.messages.add(f"{word} cluster {i} refcount={r1} reference={r2}")
                if num_fixed:
                    self._update_refcount(i, r2)
                    if r2 == 0:
                        freed.append(i)
                    setattr(res, num_fixed, getattr(res, num_fixed) + 1)
                    continue
                if r1 < r2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
        if self._dirty_refblocks:
            self._flush_refblocks()
        if not (res.corruptions or res.check_errors or rebuild):
            # Only for an otherwise sound image: clusters that merely look leaked because
            # a broken table could not be followed keep their bytes.
            self._discard_clusters(freed)
        return rebuild, highest

    def _discard_clusters(self, clusters: list[int]) -> None:
        """Punch holes where freed clusters were (QCOW2_DISCARD_ALWAYS), in runs."""
        if self.writer is None or not clusters:
            return
        cs = self.cluster_size
        start = prev = clusters[0]
        for c in [*clusters[1:], -1]:
            if c != prev + 1:
                self.writer.discard(start * cs, (prev - start + 1) * cs)
                start = c
            prev = c

    # -- check_oflag_copied ---------------------------------------------------------------
    def _check_oflag_copied(self, res: _Result, fix: int) -> None:
        """check_oflag_copied: QCOW_OFLAG_COPIED must be set exactly when refcount == 1."""
        import numpy as np

        if fix & BDRV_FIX_ERRORS:
            repair = True
        elif fix & BDRV_FIX_LEAKS:
            repair = not (res.check_errors or res.corruptions or res.leaks)
        else:
            repair = False
        u = np.uint64
        cs = self.cluster_size
        word = "Repairing" if repair else "ERROR"
        used = np.flatnonzero(self.l1_table & u(L1E_OFFSET_MASK))
        l2_refcounts, l2_errors = self.get_refcounts(
            (self.l1_table[used] & u(L1E_OFFSET_MASK)) >> u(self.cluster_bits), signal=False
        )
        for n, i in enumerate(used.tolist()):
            l1_entry = int(self.l1_table[i])
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if l2_errors[n]:
                self._refblock_offset(l2_offset >> self.refcount_block_bits)  # signals once
                continue
            refcount = int(l2_refcounts[n])
            if (refcount == 1) != bool(l1_entry & QCOW_OFLAG_COPIED):
                res.corruptions += 1
                self.messages.add(
                    f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} "
                    f"refcount={refcount}"
                )
                if repair:
                    new = (
                        l1_entry | QCOW_OFLAG_COPIED
                        if refcount == 1
                        else l1_entry & ~QCOW_OFLAG_COPIED
                    )
                    self.l1_table[i] = new
                    where = self.h.l1_table_offset + 8 * i
                    if not self._pre_write_overlap_check(QCOW2_OL_ACTIVE_L1, where, 8):
                        res.check_errors += 1
                        raise _CheckFailed(EIO)
                    self._write(where, struct.pack(">Q", new))
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            table = np.frombuffer(self.host.pread(l2_offset, cs), dtype=">u8").astype(u)
            step = 2 if self.extended else 1
            entries = table[0::step]
            compressed = (entries & u(QCOW_OFLAG_COMPRESSED)) != 0
            off = entries & u(L2E_OFFSET_MASK)
            copied = (entries & u(QCOW_OFLAG_COPIED)) != 0
            if self.extended:
                zflag = np.zeros(entries.size, dtype=bool)
            else:
                zflag = (entries & u(QCOW_OFLAG_ZERO)) != 0
            allocated = ~compressed & (off != 0)
            if self.has_data_file:
                allocated |= ~compressed & ~zflag & copied
            sel = np.flatnonzero(allocated)
            if sel.size == 0:
                continue
            if self.has_data_file:
                refcounts = np.ones(sel.size, dtype=u)
                ok = np.ones(sel.size, dtype=bool)
            else:
                refcounts, err = self.get_refcounts(off[sel] >> u(self.cluster_bits))
                ok = ~err
            wrong = ok & ((refcounts == 1) != copied[sel])
            if not wrong.any():
                continue
            dirty = 0
            for j, rc in zip(sel[wrong].tolist(), refcounts[wrong].tolist(), strict=True):
                entry = int(entries[j])
                res.corruptions += 1
                self.messages.add(
                    f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                )
                if repair:
                    new = entry | QCOW_OFLAG_COPIED if rc == 1 else entry & ~QCOW_OFLAG_COPIED
                    table[j * step] = new
                    dirty += 1
            if dirty:
                if not self._pre_write_overlap_check(QCOW2_OL_ACTIVE_L2, l2_offset, cs):
                    self.messages.add(
                        f"ERROR: Could not write L2 table; metadata overlap check failed: {EIO}"
                    )
                    res.check_errors += 1
                    raise _CheckFailed(EIO)
                self._write(l2_offset, table.astype(">u8").tobytes())
                res.corruptions -= dirty
                res.corruptions_fixed += dirty

    # -- rebuild_refcount_structure ---------------------------------------------------------
    def _alloc_clusters_imrt(self, imrt: _Imrt, count: int, first_free: int) -> tuple[int, int]:
        """alloc_clusters_imrt: ``(cluster, first_free_cluster)`` of ``count`` free clusters,
        found from ``first_free`` on (growing the IMRT past its end if needed)."""
        import numpy as np

        cluster = first_free
        size = imrt.size
        run_start = -1
        contiguous = 0
        if cluster < size:
            free = imrt.counts[cluster:size] == 0
            zeros = np.flatnonzero(free)
            if zeros.size:
                first_free = cluster + int(zeros[0])
                # Starts and lengths of the runs of free clusters.
                breaks = np.flatnonzero(np.diff(zeros) != 1)
                starts = np.concatenate(([zeros[0]], zeros[breaks + 1]))
                ends = np.concatenate((zeros[breaks] + 1, [zeros[-1] + 1]))
                long_enough = np.flatnonzero(ends - starts >= count)
                if long_enough.size:
                    run_start = cluster + int(starts[long_enough[0]])
                elif int(ends[-1]) == size - cluster:
                    contiguous = int(ends[-1] - starts[-1])
            if run_start < 0:
                cluster = size
        if run_start < 0:
            imrt.resize(cluster + count - contiguous)
            run_start = cluster - contiguous
        imrt.counts[run_start : run_start + count] = 1
        return run_start, first_free

    def _write_refblocks(
        self, imrt: _Imrt, first_cluster: int, end_cluster: int, reftable: list[int]
    ) -> bool:
        """rebuild_refcounts_write_refblocks: returns whether ``reftable`` grew."""
        import numpy as np

        from qcowlib.formats.qcow2.refcount import encode_block

        cs = self.cluster_size
        rbs = self.refcount_block_size
        first_free = 0
        grown = False
        cluster = first_cluster
        while cluster < end_cluster:
            nz = np.flatnonzero(imrt.counts[cluster : min(end_cluster, imrt.size)])
            if nz.size == 0:
                break
            cluster += int(nz[0])
            index = cluster >> self.refcount_block_bits
            block_start = index << self.refcount_block_bits
            if index < len(reftable) and reftable[index]:
                offset = reftable[index]
            else:
                first_free = max(first_free, block_start)
                cluster_index, first_free = self._alloc_clusters_imrt(imrt, 1, first_free)
                offset = cluster_index * cs
                end_cluster = max(end_cluster, cluster_index + 1)
                if len(reftable) <= index:
                    entries = -(-((index + 1) * 8) // cs) * cs // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[index] = offset
            if not self._pre_write_overlap_check(0, offset, cs):
                self.messages.add(f"ERROR writing refblock: {EIO}")
                raise _CheckFailed(EIO)
            values = np.zeros(rbs, dtype=np.uint64)
            part = imrt.counts[block_start : min(block_start + rbs, imrt.size)]
            values[: part.size] = part
            self._write(offset, encode_block(values, self.refcount_order))
            cluster = block_start + rbs
        return grown

    def _rebuild_refcount_structure(self, res: _Result, imrt: _Imrt) -> None:
        """rebuild_refcount_structure: new refcount blocks and table from the IMRT.

        The old structure is leaked; the caller's second pass frees it.
        """
        import numpy as np

        cs = self.cluster_size
        self._refblocks.clear()
        self._dirty_refblocks.clear()
        reftable: list[int] = []
        try:
            self._write_refblocks(imrt, 0, imrt.size, reftable)
            while True:
                length = len(reftable) * 8
                clusters = -(-length // cs)
                start, _ = self._alloc_clusters_imrt(imrt, clusters, 0)
                if not self._write_refblocks(imrt, start, start + clusters, reftable):
                    break
        except _CheckFailed:
            res.check_errors += 1
            raise
        offset = start * cs
        if not self._pre_write_overlap_check(0, offset, length):
            self.messages.add(f"ERROR writing reftable: {EIO}")
            raise _CheckFailed(EIO)
        table = np.array(reftable, dtype=np.uint64)
        self._write(offset, table.astype(">u8").tobytes())
        assert self.writer is not None
        self.writer.write_refcount_table_pointer(offset, clusters)
        self.refcount_table = table
        self.refcount_table_offset = offset


def _alt_hex(value: int) -> str:
    """C's ``%#x``: 0 has no prefix."""
    return f"{value:#x}" if value else "0"
