"""Image format detection ("probing") from the leading and trailing bytes of a file.

Pure: :func:`probe` takes the first :data:`PROBE_HEAD_SIZE` bytes, the last
:data:`PROBE_TAIL_SIZE` bytes and the file size, and returns a :class:`Probe`.  It opens
no files and never raises; anything it does not recognise is ``raw``.

The checks follow QEMU's own probe functions so that qcowlib and ``qemu-img`` agree on
what a file is, with the deliberate differences listed below.

* ``qcow2`` -- ``block/qcow2.c`` ``qcow2_probe``: magic ``QFI\\xfb`` and a big-endian
  version 2 or 3.  Versions above 3 are ``qcow2`` with ``detail="unsupported-version"``
  (QEMU claims none of them): the qcow2 parser then refuses them with a clear
  "unsupported version" error, instead of the file being silently treated as a raw disk
  that starts with an image header.  Magic with version 0 is claimed by no QEMU driver
  and is ``raw``.
* ``qcow`` -- ``block/qcow.c`` ``qcow_probe``: the same magic with version 1 (legacy
  QCOW).
* ``qed`` -- ``block/qed.c`` ``bdrv_qed_probe``: magic ``QED\\0`` (little-endian
  ``QED_MAGIC``).
* ``parallels`` -- ``block/parallels.c`` ``parallels_probe``: magic ``WithoutFreeSpace``
  or ``WithouFreSpacExt`` and little-endian version 2.

  These three QEMU probes want a whole header in their buffer, but QEMU 7.2 always
  hands them :data:`QEMU_PROBE_BUF_SIZE` bytes, zero-filled past the end of a short
  file: a file shorter than the header is still that format (and then refused when
  opened), as here.
* ``vmdk`` -- ``block/vmdk.c`` ``vmdk_probe``: magic ``KDMV`` (hosted sparse extent,
  VMDK4) or ``COWD`` (VMware 3 / ESX vmfsSparse extent), or a text descriptor.  A text
  descriptor is recognised as QEMU does: skipping ``#`` comment lines and blank lines made
  of spaces, the first other line must be ``version=1``, ``version=2`` or ``version=3``
  ended by LF or CRLF.  Like QEMU, only the first :data:`QEMU_PROBE_BUF_SIZE` bytes are
  scanned for that.  ``detail`` is ``"descriptor"`` for a text descriptor (the caller
  parses it for the createType and the extents it names); for ``KDMV`` it is the
  ``createType`` of the embedded descriptor when that lies within ``head`` (e.g.
  ``"monolithicSparse"``, ``"streamOptimized"``), else ``None``; ``None`` for ``COWD``.
* ``vdi`` -- ``block/vdi.c`` ``vdi_probe``: signature ``0xbeda107f`` little-endian at
  offset 0x40.
* ``vpc`` (VHD) -- ``block/vpc.c`` ``vpc_probe``: cookie ``conectix`` at offset 0 (the
  footer copy that dynamic and differencing VHDs start with).  QEMU does not detect fixed
  VHDs, which have only a footer at the end of the file (``qemu-img`` calls them
  ``raw``).  qcowlib does: the last 512 bytes must hold a footer with cookie
  ``conectix``, a valid checksum, disk type 2 (fixed), and a current size that fits in
  the file before the footer; the result has ``detail="footer-only"``.
* ``vhdx`` -- ``block/vhdx.c`` ``vhdx_probe``: file type identifier ``vhdxfile`` at 0.
* ``luks`` -- ``crypto/block-luks.c`` ``qcrypto_block_luks_has_format``: magic
  ``LUKS\\xba\\xbe`` and big-endian version 1 at offset 6.  QEMU only knows LUKS1;
  qcowlib also reports version 2 (cryptsetup's LUKS2) as ``luks`` so that it is refused
  as unsupported rather than read as a raw disk.
* ``iso`` -- not a QEMU format (QEMU reads ISO images as ``raw``): an ISO 9660 volume
  descriptor at 0x8000, i.e. standard identifier ``CD001`` at 0x8001 and descriptor
  version 1 at 0x8006.

Order of the checks: the headers that an image tool writes at offset 0 of its own file
(qcow2, qcow, qed, parallels, vmdk binary, vhdx, vdi, dynamic vpc) come first; then the
fixed-VHD footer, whose data area starts at offset 0 and so may itself begin with
anything (for instance a LUKS header or an ISO file system inside the virtual disk);
then luks, the vmdk text descriptor and iso; ``raw`` last.  An empty file is ``raw`` (as in QEMU).

Probing is a convenience for files the user trusts: a raw image's first sectors are
written by its guest, which can make them look like any format.  Callers that know the
format should not probe.
"""

from __future__ import annotations

import re
import struct
from typing import Final, NamedTuple

__all__ = [
    "FORMATS",
    "PROBE_HEAD_SIZE",
    "PROBE_TAIL_SIZE",
    "QEMU_PROBE_BUF_SIZE",
    "Probe",
    "probe",
]

#: Leading bytes :func:`probe` wants: enough for the ISO 9660 volume descriptor at
#: 0x8000 and for the embedded descriptor of a hosted sparse VMDK (20 sectors from 512).
PROBE_HEAD_SIZE: Final[int] = 64 * 1024
#: Trailing bytes :func:`probe` wants: one VHD footer.
PROBE_TAIL_SIZE: Final[int] = 512
#: Formats :func:`probe` can report, with ``qemu-img``'s names ("vpc" is VHD).
FORMATS: Final[tuple[str, ...]] = (
    "qcow2",
    "qcow",
    "qed",
    "parallels",
    "vmdk",
    "vdi",
    "vpc",
    "vhdx",
    "luks",
    "iso",
    "raw",
)
#: QEMU's BLOCK_PROBE_BUF_SIZE: how much of the file qemu's probes see.  The VMDK text
#: descriptor is only looked for there, so that qcowlib agrees with qemu-img about it.
QEMU_PROBE_BUF_SIZE: Final[int] = 2048

# --- qcow2 (docs/interop/qcow2.txt) ------------------------------------------------------
_QCOW_MAGIC: Final = b"QFI\xfb"
_QCOW2_VERSIONS: Final = (2, 3)

# --- qed (docs/interop/qed_spec.txt) -----------------------------------------------------
_QED_MAGIC: Final = b"QED\0"

# --- parallels (docs/interop/parallels.txt) ---------------------------------------------
_PARALLELS_MAGICS: Final = (b"WithoutFreeSpace", b"WithouFreSpacExt")
_PARALLELS_VERSION: Final = struct.pack("<I", 2)

# --- vmdk (VMware Virtual Disk Format 5.0) -------------------------------------------
_VMDK4_MAGIC: Final = b"KDMV"
_VMDK3_MAGIC: Final = b"COWD"
_SECTOR: Final = 512
#: VMDK4 header: magic, version, flags (u32 each), capacity, granularity, descriptor
#: offset and descriptor size (u64 each, in sectors), little-endian.
_VMDK4_DESC = struct.Struct("<QQ")
_VMDK4_DESC_AT: Final = 28
#: The embedded descriptor is at most this many bytes looked at (qemu: DESC_SIZE).
_VMDK_DESC_MAX: Final = 20 * _SECTOR
_VMDK_VERSION_LINES: Final = tuple(
    f"version={v}{eol}".encode() for v in (1, 2, 3) for eol in ("\n", "\r\n")
)
_CREATE_TYPE = re.compile(rb'createType\s*=\s*"([^"\r\n]{1,64})"')

# --- vdi (VirtualBox) -------------------------------------------------------------------
_VDI_SIGNATURE_AT: Final = 0x40
_VDI_SIGNATURE: Final = struct.pack("<I", 0xBEDA107F)

# --- vpc (Virtual Hard Disk Image Format Specification) ------------------------------
_VHD_COOKIE: Final = b"conectix"
_VHD_FOOTER_SIZE: Final = 512
#: Footer fields used here, big-endian: current size at 48, disk type at 60, checksum
#: at 64.
_VHD_CURRENT_SIZE = struct.Struct(">Q")
_VHD_CURRENT_SIZE_AT: Final = 48
_VHD_DISK_TYPE = struct.Struct(">I")
_VHD_DISK_TYPE_AT: Final = 60
_VHD_CHECKSUM = struct.Struct(">I")
_VHD_CHECKSUM_AT: Final = 64
_VHD_TYPE_FIXED: Final = 2

# --- vhdx (MS-VHDX) -------------------------------------------------------------------
_VHDX_SIGNATURE: Final = b"vhdxfile"

# --- luks (LUKS1 on-disk format, LUKS2 on-disk format) --------------------------------
_LUKS_MAGIC: Final = b"LUKS\xba\xbe"
_LUKS_VERSIONS: Final = (1, 2)

# --- iso (ECMA-119) ---------------------------------------------------------------------
_ISO_DESCRIPTOR_AT: Final = 0x8000
_ISO_IDENTIFIER: Final = b"CD001"
_ISO_VERSION: Final = 1


class Probe(NamedTuple):
    """What :func:`probe` found.

    ``format`` is one of :data:`FORMATS`.  ``detail`` refines it where that matters to the
    caller: ``"footer-only"`` for a fixed VHD found by its footer, ``"descriptor"`` for a
    VMDK text descriptor, the ``createType`` of a binary VMDK when its embedded descriptor
    was seen, ``"unsupported-version"`` for a qcow header with a version above 3;
    ``None`` otherwise.
    """

    format: str
    detail: str | None = None


def probe(head: bytes, tail: bytes, file_size: int) -> Probe:
    """Detect the format of an image from its first and last bytes.

    ``head`` is the first ``min(PROBE_HEAD_SIZE, file_size)`` bytes of the file and
    ``tail`` the last ``min(PROBE_TAIL_SIZE, file_size)`` bytes (they overlap for small
    files).  Shorter buffers are accepted; checks that need bytes not given fail.  Never
    raises; returns ``Probe("raw", None)`` when nothing else matches.  See the module
    documentation for the rules and how they relate to QEMU's.
    """
    head = bytes(head[:PROBE_HEAD_SIZE])
    tail = bytes(tail[-PROBE_TAIL_SIZE:]) if tail else b""
    if file_size <= 0:
        return Probe("raw")
    for check in (
        _probe_qcow2,
        _probe_qed,
        _probe_parallels,
        _probe_vmdk_binary,
        _probe_vhdx,
        _probe_vdi,
    ):
        found = check(head)
        if found is not None:
            return found
    if head[:8] == _VHD_COOKIE:
        # A fixed VHD of virtual size 0 is nothing but its footer.
        if file_size == _VHD_FOOTER_SIZE and _is_fixed_vhd_footer(tail, file_size):
            return Probe("vpc", "footer-only")
        return Probe("vpc")
    if _is_fixed_vhd_footer(tail, file_size):
        return Probe("vpc", "footer-only")
    for check in (_probe_luks, _probe_vmdk_descriptor, _probe_iso):
        found = check(head)
        if found is not None:
            return found
    return Probe("raw")


def _probe_qcow2(head: bytes) -> Probe | None:
    if len(head) < 8 or head[:4] != _QCOW_MAGIC:
        return None
    version = int.from_bytes(head[4:8], "big")
    if version in _QCOW2_VERSIONS:
        return Probe("qcow2")
    if version == 1:
        return Probe("qcow")
    if version > 3:
        return Probe("qcow2", "unsupported-version")
    return None


def _probe_qed(head: bytes) -> Probe | None:
    return Probe("qed") if head[:4] == _QED_MAGIC else None


def _probe_parallels(head: bytes) -> Probe | None:
    if head[:16] not in _PARALLELS_MAGICS:
        return None
    # Zero-filled past a short file, as QEMU's probe buffer is.
    version = head[16:20].ljust(4, b"\0")
    return Probe("parallels") if version == _PARALLELS_VERSION else None


def _probe_vmdk_binary(head: bytes) -> Probe | None:
    magic = head[:4]
    if magic == _VMDK3_MAGIC:
        return Probe("vmdk")
    if magic != _VMDK4_MAGIC:
        return None
    return Probe("vmdk", _embedded_create_type(head))


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
    length = min(desc_sectors * _SECTOR, _VMDK_DESC_MAX)
    text = head[start : start + length].split(b"\0", 1)[0]
    return _create_type(text)


def _create_type(text: bytes) -> str | None:
    match = _CREATE_TYPE.search(text)
    if match is None:
        return None
    value = match.group(1).decode("ascii", "replace").strip()
    return value or None


def _probe_vmdk_descriptor(head: bytes) -> Probe | None:
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
        if buf.startswith(_VMDK_VERSION_LINES, pos):
            return Probe("vmdk", "descriptor")
        return None
    return None


def _probe_vhdx(head: bytes) -> Probe | None:
    return Probe("vhdx") if head[:8] == _VHDX_SIGNATURE else None


def _probe_vdi(head: bytes) -> Probe | None:
    at = _VDI_SIGNATURE_AT
    return Probe("vdi") if head[at : at + 4] == _VDI_SIGNATURE else None


def _is_fixed_vhd_footer(tail: bytes, file_size: int) -> bool:
    """Whether ``tail`` ends with a valid footer of a fixed VHD that fits ``file_size``."""
    if len(tail) < _VHD_FOOTER_SIZE or file_size < _VHD_FOOTER_SIZE:
        return False
    footer = tail[-_VHD_FOOTER_SIZE:]
    if footer[:8] != _VHD_COOKIE:
        return False
    disk_type: int = _VHD_DISK_TYPE.unpack_from(footer, _VHD_DISK_TYPE_AT)[0]
    if disk_type != _VHD_TYPE_FIXED:
        return False
    current_size: int = _VHD_CURRENT_SIZE.unpack_from(footer, _VHD_CURRENT_SIZE_AT)[0]
    if current_size > file_size - _VHD_FOOTER_SIZE:
        return False
    checksum: int = _VHD_CHECKSUM.unpack_from(footer, _VHD_CHECKSUM_AT)[0]
    return checksum == _vhd_checksum(footer)


def _vhd_checksum(footer: bytes) -> int:
    """The VHD footer checksum: ones' complement of the byte sum, checksum field as zero."""
    at = _VHD_CHECKSUM_AT
    total = sum(footer[:at]) + sum(footer[at + 4 : _VHD_FOOTER_SIZE])
    return ~total & 0xFFFFFFFF


def _probe_luks(head: bytes) -> Probe | None:
    if len(head) < 8 or head[:6] != _LUKS_MAGIC:
        return None
    version = int.from_bytes(head[6:8], "big")
    return Probe("luks") if version in _LUKS_VERSIONS else None


def _probe_iso(head: bytes) -> Probe | None:
    at = _ISO_DESCRIPTOR_AT
    if len(head) < at + 7:
        return None
    if head[at + 1 : at + 6] != _ISO_IDENTIFIER or head[at + 6] != _ISO_VERSION:
        return None
    return Probe("iso")
