"""The bits of L1, L2 and refcount table entries (qcow2.txt, "Cluster mapping" and
"Host cluster management"), for code that decodes entries without numpy too.

The table codecs over whole tables (:mod:`~qcowlib.formats.qcow2.tables`, numpy) and
over a few tables (:mod:`~qcowlib.formats.qcow2.tables_plain`, plain Python) share what
is declared here: the masks, the run kinds, the compressed cluster descriptor's split
and the errors a bad entry raises, so that both decoders word a problem alike.
"""

from __future__ import annotations

from typing import Final

from qcowlib.errors import CorruptImage

#: Bits 9-55 of L1 and standard L2 entries hold a cluster-aligned host offset.
OFFSET_MASK: Final = 0x00FF_FFFF_FFFF_FE00
L1E_RESERVED_MASK: Final = 0x7F00_0000_0000_01FF
L2E_STD_RESERVED_MASK: Final = 0x3F00_0000_0000_01FE
OFLAG_COPIED: Final = 1 << 63
OFLAG_COMPRESSED: Final = 1 << 62
OFLAG_ZERO: Final = 1
#: Bits 9-63 of a refcount table entry: the refcount block's offset.
REFT_OFFSET_MASK: Final = 0xFFFF_FFFF_FFFF_FE00
#: Bits 0-8 of a refcount table entry are reserved.
REFT_RESERVED_MASK: Final = 0x1FF

#: Subclusters per cluster with extended L2 entries.
SUBCLUSTERS: Final = 32
#: The allocation half (bits 0-31) of an extended L2 entry's subcluster bitmap; the
#: zero half is bits 32-63.
SUBCLUSTER_ALLOC_MASK: Final = 0xFFFF_FFFF

# Run kinds of decoded L2 tables (small ints so they live in numpy arrays; the numbers
# of :data:`qcowlib.core.disk.RUN_KINDS`).
KIND_UNALLOCATED: Final = 0
KIND_DATA: Final = 1
KIND_ZERO: Final = 2
KIND_COMPRESSED: Final = 3


def entries_per_block(cluster_bits: int, refcount_order: int) -> int:
    """Refcount entries in one refcount block."""
    return (1 << (cluster_bits + 3)) >> refcount_order


def compressed_offset_bits(cluster_bits: int) -> int:
    """``x = 62 - (cluster_bits - 8)``: bits 0..x-1 of a compressed cluster descriptor
    hold the host offset, the next ``cluster_bits - 8`` the extra 512-byte sectors."""
    return 62 - (cluster_bits - 8)


def compressed_sectors_mask(cluster_bits: int) -> int:
    """The mask of a compressed cluster descriptor's sector count (after the shift)."""
    return (1 << (cluster_bits - 8)) - 1


def unaligned_cluster(host: int, table: str, index: int) -> CorruptImage:
    """The error for an L2 entry whose (data or preallocated zero) cluster is unaligned."""
    return CorruptImage(
        f"cluster allocation offset {host:#x} is unaligned",
        structure=table,
        field=f"entry[{index}]",
    )


def compressed_with_bitmap(table: str, index: int) -> CorruptImage:
    """The error for an extended L2 entry of a compressed cluster with a bitmap."""
    return CorruptImage(
        "compressed cluster has a non-zero subcluster bitmap",
        structure=table,
        field=f"entry[{index}]",
    )


def invalid_bitmap(table: str, index: int) -> CorruptImage:
    """The error for a subcluster bitmap QEMU refuses (a subcluster allocated and zero,
    or allocated in a cluster without a host cluster)."""
    return CorruptImage(
        "invalid subcluster bitmap",
        structure=table,
        field=f"entry[{index}]",
    )


def unaligned_l2_table(offset: int, table: str, index: int) -> CorruptImage:
    """The error for an L1 entry pointing at an unaligned L2 table."""
    return CorruptImage(
        f"{table} entry {index} points at unaligned L2 table offset {offset:#x}",
        structure=table,
        field=f"entry[{index}]",
    )
