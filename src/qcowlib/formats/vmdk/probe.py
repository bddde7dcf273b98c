"""Is it VMDK?  ``block/vmdk.c`` ``vmdk_probe``, in two parts asked at different points
of the probing order.

:func:`probe_binary`: magic ``KDMV`` (hosted sparse extent, VMDK4) or ``COWD`` (VMware 3
/ ESX vmfsSparse extent).  For ``KDMV`` the detail is the ``createType`` of the embedded
descriptor when that lies within ``head`` (e.g. ``"monolithicSparse"``,
``"streamOptimized"``), else None; None for ``COWD``.

:func:`probe_descriptor`: a text descriptor, recognised as QEMU does: skipping ``#``
comment lines and blank lines made of spaces, the first other line must be
``version=1``, ``version=2`` or ``version=3`` ended by LF or CRLF.  Like QEMU, only the
first :data:`~qcowlib.core.probe.QEMU_PROBE_BUF_SIZE` bytes are scanned for that.  The
detail is ``"descriptor"`` (the caller parses it for the createType and the extents it
names).  It is asked late: a text file is also what a raw disk may start with.
"""

from __future__ import annotations

import re
import struct
from typing import Final

from qcowlib.core.probe import QEMU_PROBE_BUF_SIZE, Match

__all__ = ["probe_binary", "probe_descriptor"]

_VMDK4_MAGIC: Final = b"KDMV"
_VMDK3_MAGIC: Final = b"COWD"
_SECTOR: Final = 512
#: VMDK4 header: magic, version, flags (u32 each), capacity, granularity, descriptor
#: offset and descriptor size (u64 each, in sectors), little-endian.
_VMDK4_DESC = struct.Struct("<QQ")
_VMDK4_DESC_AT: Final = 28
#: The embedded descriptor is at most this many bytes looked at (qemu: DESC_SIZE).
_DESC_MAX: Final = 20 * _SECTOR
_VERSION_LINES: Final = tuple(
    f"version={v}{eol}".encode() for v in (1, 2, 3) for eol in ("\n", "\r\n")
)
_CREATE_TYPE = re.compile(rb'createType\s*=\s*"([^"\r\n]{1,64})"')


def probe_binary(head: bytes, tail: bytes, file_size: int) -> Match | None:
    magic = head[:4]
    if magic == _VMDK3_MAGIC:
        return Match()
    if magic != _VMDK4_MAGIC:
        return None
    return Match(_embedded_create_type(head))


def _embedded_create_type(head: bytes) -> str | None:
    """``createType`` from the descriptor embedded in a VMDK4 sparse extent, if in head."""
    if len(head) < _VMDK4_DESC_AT + _VMDK4_DESC.size:
        return None
    desc_sector: int
    desc_sectors: int
    desc_sector, desc_sectors = _VMDK4_DESC.unpack_from(head, _VMDK4_DESC_AT)
    if desc_sector == 0 or desc_sectors == 0 or desc_sector >= len(head) // _SECTOR:
        return None
    start = desc_sector * _SECTOR
    length = min(desc_sectors * _SECTOR, _DESC_MAX)
    text = head[start : start + length].split(b"\0", 1)[0]
    match = _CREATE_TYPE.search(text)
    if match is None:
        return None
    value = match.group(1).decode("ascii", "replace").strip()
    return value or None


def probe_descriptor(head: bytes, tail: bytes, file_size: int) -> Match | None:
    """The text-descriptor branch of qemu's ``vmdk_probe``, on the first 2048 bytes."""
    buf = head[:QEMU_PROBE_BUF_SIZE]
    end = len(buf)
    pos = 0
    while pos < end:
        char = buf[pos]
        if char == ord("#"):
            newline = buf.find(b"\n", pos)
            if newline < 0:
                return None
            pos = newline + 1
            continue
        if char == ord(" "):
            while pos < end and buf[pos] == ord(" "):
                pos += 1
            if pos < end and buf[pos] == ord("\r"):
                pos += 1
            if pos >= end or buf[pos] != ord("\n"):
                return None
            pos += 1
            continue
        if buf.startswith(_VERSION_LINES, pos):
            return Match("descriptor")
        return None
    return None
