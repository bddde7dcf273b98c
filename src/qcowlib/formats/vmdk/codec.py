"""VMware VMDK: hosted sparse extent header, grain directory and tables, stream markers,
and the text descriptor.

Pure: functions here turn bytes into values and values into bytes.  Nothing opens a
file; callers read the ranges named by :class:`SparseExtentHeader` and hand them over.

Layouts follow VMware's "Virtual Disk Format 5.0" (VDF) and QEMU ``block/vmdk.c``,
whose field names are used here::

    0x000  SparseExtentHeader (512 bytes, magic "KDMV", all integers little-endian):
           version, flags, capacity, grain_size, desc_offset, desc_size,
           num_gtes_per_gt, rgd_offset, gd_offset, grain_offset, unclean_shutdown,
           check_bytes ("\n \r\n"), compress_algorithm, padding
           (sizes and offsets in 512-byte sectors)
    desc   the embedded text descriptor (monolithicSparse, streamOptimized)
    gd     grain directory: one uint32 per grain table, the table's sector (0: none)
    gt     grain tables of ``num_gtes_per_gt`` uint32 entries: the grain's sector,
           0 (unallocated) or 1 (zeroed grain, VDF "zeroed-grain GTE")

A stream-optimized extent (VDF section 4) stores each grain behind a *grain marker*
(``lba``, compressed ``size``, zlib data, padded to a sector); metadata follows
*markers* (``num_sectors``, ``size`` 0, ``type``: EOS, GT, GD, FOOTER).  When the header's
``gd_offset`` is :data:`GD_AT_END`, the last three sectors of the file hold a footer
marker, a copy of the header with the real ``gd_offset``, and an end-of-stream marker.

The codec is split along the format's structures; this module gathers its public
names, so callers import one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qcowlib.formats.vmdk.descriptor import (
    DESCRIPTOR_TYPES,
    EXTENT_TYPES,
    FLAT_TYPES,
    VmdkDescriptor,
    VmdkExtent,
    build_descriptor,
    check_descriptor,
    descriptor_problems,
    parse_descriptor,
    qemu_extents,
)
from qcowlib.formats.vmdk.grains import (
    Marker,
    build_grain_marker,
    build_marker,
    check_grain_tables,
    compress_grain,
    decode_table,
    decompress_grain,
    encode_table,
    grain_table_offsets,
    parse_grain_marker,
    parse_marker,
    parse_stream_footer,
    stream_footer_header,
)
from qcowlib.formats.vmdk.header import (
    CHECK_BYTES,
    COMPRESSION_DEFLATE,
    COMPRESSION_NONE,
    DEFAULT_GRAIN_SIZE,
    DEFAULT_NUM_GTES_PER_GT,
    DESC_SECTORS,
    GD_AT_END,
    GRAIN_MARKER_HEAD_SIZE,
    GTE_ZEROED,
    MARKER_EOS,
    MARKER_FOOTER,
    MARKER_GD,
    MARKER_GT,
    SECTOR,
    VMDK3_MAGIC,
    VMDK4_FLAG_COMPRESS,
    VMDK4_FLAG_MARKER,
    VMDK4_FLAG_NL_DETECT,
    VMDK4_FLAG_RGD,
    VMDK4_FLAG_ZERO_GRAIN,
    VMDK4_MAGIC,
    VMDK_CAPACITY_MAX,
    VMDK_DESC_MAX,
    VMDK_DESC_SECTOR,
    VMDK_GRAIN_SIZE_MAX,
    VMDK_MAX_EXTENTS,
    SparseExtentHeader,
    build_header,
    decode_header,
    grain_directory_extent,
    header_problems,
    parse_header,
)

if TYPE_CHECKING:
    from qcowlib.formats.vmdk.grains import U32

__all__ = [
    "CHECK_BYTES",
    "COMPRESSION_DEFLATE",
    "COMPRESSION_NONE",
    "DEFAULT_GRAIN_SIZE",
    "DEFAULT_NUM_GTES_PER_GT",
    "DESCRIPTOR_TYPES",
    "DESC_SECTORS",
    "EXTENT_TYPES",
    "FLAT_TYPES",
    "GD_AT_END",
    "GRAIN_MARKER_HEAD_SIZE",
    "GTE_ZEROED",
    "MARKER_EOS",
    "MARKER_FOOTER",
    "MARKER_GD",
    "MARKER_GT",
    "SECTOR",
    "U32",
    "VMDK3_MAGIC",
    "VMDK4_FLAG_COMPRESS",
    "VMDK4_FLAG_MARKER",
    "VMDK4_FLAG_NL_DETECT",
    "VMDK4_FLAG_RGD",
    "VMDK4_FLAG_ZERO_GRAIN",
    "VMDK4_MAGIC",
    "VMDK_CAPACITY_MAX",
    "VMDK_DESC_MAX",
    "VMDK_DESC_SECTOR",
    "VMDK_GRAIN_SIZE_MAX",
    "VMDK_MAX_EXTENTS",
    "Marker",
    "SparseExtentHeader",
    "VmdkDescriptor",
    "VmdkExtent",
    "build_descriptor",
    "build_grain_marker",
    "build_header",
    "build_marker",
    "check_descriptor",
    "check_grain_tables",
    "compress_grain",
    "decode_header",
    "decode_table",
    "decompress_grain",
    "descriptor_problems",
    "encode_table",
    "grain_directory_extent",
    "grain_table_offsets",
    "header_problems",
    "parse_descriptor",
    "parse_grain_marker",
    "parse_header",
    "parse_marker",
    "parse_stream_footer",
    "qemu_extents",
    "stream_footer_header",
]
