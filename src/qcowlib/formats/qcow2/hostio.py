"""How the qcow2 driver reaches its host file: the header and the fields rewritten in place.

The reader, the in-place writer, ``check`` and its repairs all read the header through
:func:`read_header`, change header fields through :func:`write_fields` (the byte offsets
of those fields are written down once, qcow2.txt "Header") and rewrite the whole header
through :func:`write_header`.  The file itself
comes from the caller as a :class:`HostIO` (``qcowlib.core.hostfile.HostFile`` is one);
this module opens nothing.
"""

from __future__ import annotations

import struct
from typing import Final, Protocol

from qcowlib.errors import CorruptImage, InvalidArgument, QcowlibError, TruncatedImage
from qcowlib.formats.qcow2 import extensions as hext
from qcowlib.formats.qcow2 import header as hdr

__all__ = [
    "HEADER_FIELDS",
    "HostIO",
    "field_patch",
    "read_header",
    "with_backing",
    "write_fields",
    "write_header",
]


class HostIO(Protocol):
    """The host file operations the qcow2 driver uses (reads past the end give zeros;
    writes keep :attr:`size` current)."""

    path: str
    size: int

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def truncate(self, size: int) -> None: ...

    def punch_hole(self, offset: int, length: int) -> bool: ...

    def sync(self) -> None: ...


#: Header fields rewritten in place: byte offset and width (qcow2.txt "Header").
HEADER_FIELDS: Final = {
    "size": (24, 8),
    "l1_size": (36, 4),
    "l1_table_offset": (40, 8),
    "refcount_table_offset": (48, 8),
    "refcount_table_clusters": (56, 4),
    "nb_snapshots": (60, 4),
    "snapshots_offset": (64, 8),
    "incompatible_features": (72, 8),
}


def field_patch(**values: int) -> tuple[int, bytes]:
    """The bytes of adjacent header fields as one write: ``(offset, data)``.

    Fields that belong together (``l1_size`` and ``l1_table_offset``, the refcount table
    pointer) then change in one sector write.  Raises :class:`ValueError` for unknown or
    non-adjacent fields.
    """
    placed = sorted((*HEADER_FIELDS[name], value) for name, value in values.items())
    start = pos = placed[0][0]
    out = bytearray()
    for offset, width, value in placed:
        if offset != pos:
            raise ValueError("header fields written together must be adjacent")
        out += value.to_bytes(width, "big")
        pos += width
    return start, bytes(out)


def write_fields(host: HostIO, **values: int) -> None:
    """Rewrite header fields in place (one write; see :func:`field_patch`)."""
    offset, data = field_patch(**values)
    host.pwrite(offset, data)


def write_header(host: HostIO, h: hdr.Header) -> None:
    """Write a whole header with its extensions (and backing file name) over the first
    cluster; it must fit there, as QEMU requires.  Raises :class:`InvalidArgument`."""
    raw = hdr.build_header(h)
    cs = h.cluster_size
    if len(raw) > cs:
        raise InvalidArgument("header, extensions and backing name do not fit in a cluster")
    host.pwrite(0, raw.ljust(min(cs, max(len(raw), 4096)), b"\0")[:cs])


def with_backing(h: hdr.Header, name: str | None, fmt: str | None) -> hdr.Header:
    """``h`` with a new backing file name and format (or none): the backing format
    extension first, the name right after the extensions.  Raises
    :class:`InvalidArgument` for a name longer than the spec allows."""
    exts = [e for e in h.extensions if e.type != hext.EXT_BACKING_FORMAT]
    if name and fmt:
        exts.insert(0, hext.extension(hext.EXT_BACKING_FORMAT, fmt.encode()))
    ext_end = h.header_length + sum(8 + -(-len(e.data) // 8) * 8 for e in exts) + 8
    raw_name = hext.encode_path(name) if name else b""
    if len(raw_name) > hdr.MAX_BACKING_FILE_NAME:
        raise InvalidArgument("backing file name is too long")
    return h.replace(
        backing_file=name or None,
        backing_format=fmt if name else None,
        backing_file_offset=ext_end if name else 0,
        backing_file_size=len(raw_name),
        extensions=tuple(exts),
    )


def read_header(host: HostIO, *, for_check: bool = False) -> hdr.Header:
    """Read and parse the header of a qcow2 file (the first cluster).

    Opening checks tables against the file size; ``for_check`` parses as QEMU's open
    does for ``check`` instead (tables may lie past the end; the bitmaps extension is
    checked as ``qcow2_read_extensions`` does).  Raises :class:`TruncatedImage` and the
    other errors of :func:`~qcowlib.formats.qcow2.header.parse_header`.
    """
    if host.size < hdr.V2_HEADER_LENGTH:
        raise TruncatedImage("qcow2 header is truncated", file=host.path, structure="header")
    head = host.pread(0, min(host.size, 4096))
    cluster_bits = int.from_bytes(head[20:24], "big")
    if hdr.MIN_CLUSTER_BITS <= cluster_bits <= hdr.MAX_CLUSTER_BITS and (1 << cluster_bits) > 4096:
        head = host.pread(0, min(host.size, 1 << cluster_bits))
    try:
        h = hdr.parse_header(head, None if for_check else host.size)
        if for_check:
            _validate_bitmaps_extension(h)
    except QcowlibError as exc:
        raise exc.with_file(host.path) from None
    return h


def _validate_bitmaps_extension(h: hdr.Header) -> None:
    """The checks qcow2_read_extensions makes on the bitmaps extension at open."""
    ext = h.bitmaps
    if ext is None or not h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
        return
    # Imported here: the bitmap codec loads construct, which a header read does not need.
    from qcowlib.formats.qcow2.bitmap import MAX_BITMAP_DIRECTORY_SIZE

    raw = next(e.data for e in h.extensions if e.type == hext.EXT_BITMAPS)
    if struct.unpack_from(">I", raw, 4)[0] != 0:
        raise CorruptImage("bitmaps extension: reserved field is not zero", structure="header")
    if ext.nb_bitmaps > 65535:
        raise CorruptImage("bitmaps extension: too many bitmaps", structure="header")
    if ext.nb_bitmaps == 0:
        raise CorruptImage("found bitmaps extension with zero bitmaps", structure="header")
    if ext.bitmap_directory_offset % h.cluster_size:
        raise CorruptImage("bitmaps extension: invalid directory offset", structure="header")
    if ext.bitmap_directory_size > MAX_BITMAP_DIRECTORY_SIZE:
        raise CorruptImage("bitmaps extension: directory is too large", structure="header")
