"""Is it VHD (qemu's ``vpc``)?  Two probes asked at different points of the order.

:func:`probe_header`: ``block/vpc.c`` ``vpc_probe``: cookie ``conectix`` at offset 0
(the footer copy that dynamic and differencing VHDs start with).

:func:`probe_footer`: QEMU does not detect fixed VHDs, which have only a footer at the
end of the file (``qemu-img`` calls them raw).  qcowlib does: the last 512 bytes must
hold a footer with cookie ``conectix``, a valid checksum, disk type 2 (fixed), and a
current size that fits in the file before the footer; the detail is ``"footer-only"``.
It is asked after the headers image tools write at offset 0, since a fixed VHD's data
starts there and may itself begin with anything.
"""

from __future__ import annotations

import struct
from typing import Final

from qcowlib.core.probe import Match

__all__ = ["probe_footer", "probe_header"]

_COOKIE: Final = b"conectix"
_FOOTER_SIZE: Final = 512
#: Footer fields used here, big-endian: current size at 48, disk type at 60, checksum
#: at 64.
_CURRENT_SIZE = struct.Struct(">Q")
_CURRENT_SIZE_AT: Final = 48
_DISK_TYPE = struct.Struct(">I")
_DISK_TYPE_AT: Final = 60
_CHECKSUM = struct.Struct(">I")
_CHECKSUM_AT: Final = 64
_TYPE_FIXED: Final = 2


def probe_header(head: bytes, tail: bytes, file_size: int) -> Match | None:
    if head[:8] != _COOKIE:
        return None
    # A fixed VHD of virtual size 0 is nothing but its footer.
    if file_size == _FOOTER_SIZE and _is_fixed_footer(tail, file_size):
        return Match("footer-only")
    return Match()


def probe_footer(head: bytes, tail: bytes, file_size: int) -> Match | None:
    return Match("footer-only") if _is_fixed_footer(tail, file_size) else None


def _is_fixed_footer(tail: bytes, file_size: int) -> bool:
    """Whether ``tail`` ends with a valid footer of a fixed VHD that fits ``file_size``."""
    if len(tail) < _FOOTER_SIZE or file_size < _FOOTER_SIZE:
        return False
    footer = tail[-_FOOTER_SIZE:]
    if footer[:8] != _COOKIE:
        return False
    disk_type: int = _DISK_TYPE.unpack_from(footer, _DISK_TYPE_AT)[0]
    if disk_type != _TYPE_FIXED:
        return False
    current_size: int = _CURRENT_SIZE.unpack_from(footer, _CURRENT_SIZE_AT)[0]
    if current_size > file_size - _FOOTER_SIZE:
        return False
    checksum: int = _CHECKSUM.unpack_from(footer, _CHECKSUM_AT)[0]
    return checksum == _checksum(footer)


def _checksum(footer: bytes) -> int:
    """The VHD footer checksum: ones' complement of the byte sum, checksum field as zero."""
    at = _CHECKSUM_AT
    total = sum(footer[:at]) + sum(footer[at + 4 : _FOOTER_SIZE])
    return ~total & 0xFFFFFFFF
