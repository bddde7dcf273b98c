"""What one ``check`` pass knows about the image (QEMU's ``BDRVQcow2State``, for checking),
and the bookkeeping every part of the check shares: results, messages, failures.

The tables QEMU keeps in memory from open are read here, but only as far as they lie
inside the file: what lies past its end reads as zeros in QEMU, and zero entries
reference nothing, so a header that claims a huge table past the end costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from qcowlib.formats.qcow2 import header as hdr
from qcowlib.formats.qcow2.hostio import write_fields
from qcowlib.formats.qcow2.overlap import OL_NAMES, MetadataAreas
from qcowlib.formats.qcow2.refcount import encode_block
from qcowlib.formats.qcow2.refcount_store import RefcountStore
from qcowlib.formats.qcow2.snapshot import SnapshotEntry
from qcowlib.formats.qcow2.tables import CompressedLayout

if TYPE_CHECKING:
    from qcowlib.formats.qcow2.hostio import HostIO
    from qcowlib.formats.qcow2.tables import U64

# BdrvCheckMode
BDRV_FIX_LEAKS: Final = 1
BDRV_FIX_ERRORS: Final = 2

#: qcow2_check_refcounts refuses files with more clusters than this (-EFBIG).
INT_MAX: Final = 2**31 - 1
INT64_MAX: Final = 2**63 - 1

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


@dataclass
class Result:
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

    def assign(self, other: Result) -> None:
        """``*res = other``."""
        self.__dict__.update(other.__dict__)

    def add(self, src: Result, allocation_info: bool) -> None:
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


class CheckFailed(Exception):
    """The check could not complete (QEMU returns -errno); ``text`` is what qemu-img says."""

    def __init__(self, errno_text: str) -> None:
        super().__init__(errno_text)
        self.text = f"Check failed: {errno_text}"


class Messages:
    """The stderr lines of a check, capped at :data:`MAX_MESSAGES`."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self.dropped = 0

    @property
    def room(self) -> int:
        """How many more lines are kept."""
        return MAX_MESSAGES - len(self._lines)

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


def alt_hex(value: int) -> str:
    """C's ``%#x``: 0 has no prefix."""
    return f"{value:#x}" if value else "0"


def eof_message(offset: int, size: int) -> str:
    return (
        "ERROR: counting reference for region exceeding the end of the file by one "
        f"cluster or more: offset 0x{offset:x} size 0x{size:x}"
    )


class CheckState:
    """One check pass over an open qcow2 file; ``writable`` when it may repair."""

    def __init__(
        self,
        host: HostIO,
        header: hdr.Header,
        messages: Messages,
        *,
        writable: bool = False,
        signaled: bool = False,
    ) -> None:
        self.host = host
        self.h = header
        self.writable = writable
        self.messages = messages
        self.signaled_corruption = signaled
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.extended = header.extended_l2
        self.l2_entry_size = header.l2_entry_size
        self.has_data_file = header.has_data_file
        self.refcount_order = header.refcount_order
        self.compressed_layout = CompressedLayout(self.cluster_bits)
        self.incompatible_features = header.incompatible_features
        # Tables QEMU keeps in memory from open: the active L1 table and the reftable.
        self.l1_table: U64 = self.read_table(header.l1_table_offset, header.l1_size)
        self.refcount_table_offset = header.refcount_table_offset
        entries = header.refcount_table_clusters * self.cluster_size // 8
        self.refcounts = RefcountStore(
            host,
            self.read_table(header.refcount_table_offset, entries),
            self.cluster_bits,
            self.refcount_order,
            table_entries=entries,
            on_unaligned=self._unaligned_refblock,
        )
        self.refcount_max = self.refcounts.max_refcount
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
        self.snapshots: list[SnapshotEntry] = []
        self.snapshots_offset = 0
        self.snapshots_size = 0
        self._areas: MetadataAreas | None = None

    # -- reading --------------------------------------------------------------------------
    def read_table(self, offset: int, entries: int) -> U64:
        """The part inside the file of a table of big-endian 64-bit entries (the rest
        reads as zeros, which reference nothing, so it is left out)."""
        inside = min(entries, max(0, self.host.size - offset) // 8)
        if inside <= 0:
            return np.zeros(0, dtype=np.uint64)
        raw = self.host.pread(offset, inside * 8)
        return np.frombuffer(raw, dtype=">u8").astype(np.uint64)

    def read_l2(self, offset: int) -> U64:
        """An L2 table's raw entries (zeros past the end of the file)."""
        return np.frombuffer(self.host.pread(offset, self.cluster_size), ">u8").astype(np.uint64)

    # -- corruption and header bits -------------------------------------------------------
    def _unaligned_refblock(self, offset: int, index: int) -> None:
        self.signal_corruption(
            f"Refblock offset {offset:#x} unaligned (reftable index: {index:#x})"
        )

    def signal_corruption(self, message: str) -> None:
        """qcow2_signal_corruption (fatal): print once; mark the image corrupt if writable."""
        fatal = self.writable
        if self.signaled_corruption and (
            not fatal or self.incompatible_features & hdr.INCOMPAT_CORRUPT
        ):
            return
        if fatal:
            self.messages.add(
                f"qcow2: Marking image as corrupt: {message}; further corruption events "
                "will be suppressed"
            )
            self.set_incompatible_features(self.incompatible_features | hdr.INCOMPAT_CORRUPT)
        else:
            self.messages.add(
                f"qcow2: Image is corrupt: {message}; further non-fatal corruption events "
                "will be suppressed"
            )
        self.signaled_corruption = True

    def set_incompatible_features(self, features: int) -> None:
        if features == self.incompatible_features:
            return
        self.incompatible_features = features
        if self.h.version >= 3 and self.writable:
            write_fields(self.host, incompatible_features=features)

    # -- writing --------------------------------------------------------------------------
    def areas(self) -> MetadataAreas:
        """Where the metadata lies now (for the overlap checks)."""
        if self._areas is None:
            cs = self.cluster_size
            self._areas = MetadataAreas(
                cluster_size=cs,
                l1=(self.h.l1_table_offset, self.h.l1_size * 8),
                refcount_table=(self.refcount_table_offset, self.refcounts.table_entries * 8),
                l1_table=self.l1_table,
                reftable_entries=self.refcounts.table,
                snapshot_table=(self.snapshots_offset, self.snapshots_size),
                inactive_l1=[(sn.l1_table_offset, sn.l1_size * 8) for sn in self.snapshots],
                bitmap_directory=(
                    (self.bitmap_directory_offset, self.bitmap_directory_size)
                    if self.nb_bitmaps
                    else (0, 0)
                ),
            )
        return self._areas

    def metadata_moved(self) -> None:
        """The refcount table or the snapshot table moved: recompute the areas."""
        self._areas = None

    def pre_write_overlap_check(self, ign: int, offset: int, size: int) -> bool:
        """qcow2_pre_write_overlap_check: False (after signalling) when writing would
        clobber metadata."""
        hit = self.areas().first_overlap(offset, size, ign=ign)
        if hit:
            self.signal_corruption(
                f"Preventing invalid write on metadata (overlaps with {OL_NAMES[hit]})"
            )
            return False
        return True

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        assert self.writable
        self.host.pwrite(offset, data)

    def flush_refblocks(self) -> None:
        """Write the refcount blocks changed in memory."""
        for offset, block in self.refcounts.take_dirty():
            self.write(offset, encode_block(block.astype(np.uint64), self.refcount_order))
