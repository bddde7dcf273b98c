"""What :mod:`qcowlib.validate` reads for itself: the image inspector's view of a file.

VMDK, VHD, VHDX, VDI and qcow2 headers are parsed by their codecs in
:mod:`qcowlib.formats`, with the checks the readers apply.  What is left here is
validate's own job, gathering what the OpenStack image inspector
(``oslo_utils.imageutils.format_inspector``, used by Glance) looks at:

* which formats it sees in the same bytes (:func:`inspector_view`), so that the
  ``glance`` policy agrees with Glance on format matching;
* LUKS1 headers ("LUKS On-Disk Format Specification" 1.2.3), MBR and GPT partition
  tables (UEFI 2.10 chapter 5) and ISO 9660 volume descriptors (ECMA-119), which no
  qcowlib reader opens;
* the qcow2 fields the safety rules read even where the qcow2 parser refuses the header.

Pure: every function here takes bytes (and, where it matters, the file size) and returns
frozen records.  Nothing opens a file; nothing follows a file name found inside an
image.  Fatal problems raise :class:`~qcowlib.errors.FormatError` subclasses naming the
structure, field and offset; problems that still let the structure be read are returned
as :class:`Problem` values so that ``validate`` can report every one of them.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any, Final

from qcowlib._frozen import record
from qcowlib.errors import CorruptImage, FormatError, QcowlibError, TruncatedImage
from qcowlib.formats._record import FixedLayout
from qcowlib.formats.luks.probe import LUKS_MAGIC
from qcowlib.formats.qcow2 import extensions as qcow2_extensions
from qcowlib.formats.qcow2 import header as qcow2_header

SECTOR: Final = 512

# ---------------------------------------------------------------------------------------
# helpers


@record
class Problem:
    """A structural problem that does not stop the rest of a structure being read."""

    message: str
    offset: int | None = None
    #: True when QEMU itself refuses the image because of it.
    fatal: bool = True

    @classmethod
    def of(cls, exc: QcowlibError, *, fatal: bool = True) -> Problem:
        """The problem a codec reports as ``exc`` (its message and file offset)."""
        return cls(exc.message, exc.offset, fatal)


def printable(text: str, limit: int = 200) -> str:
    """``text`` made safe for one line of a message: control characters escaped, capped."""
    out = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


# ---------------------------------------------------------------------------------------
# qcow2: the fields the safety rules read straight from the header bytes, so that they
# work even when the full parser (qcowlib.formats.qcow2.header) refuses the header.

QCOW_EXT_DATA_FILE: Final = qcow2_extensions.EXT_DATA_FILE
QCOW_EXT_END: Final = qcow2_extensions.EXT_END
#: Header extensions looked at: they all live in the first cluster (at most 2 MiB).
_QCOW_MAX_EXTENSIONS: Final = 4096


@record
class Qcow2Fields:
    """The qcow2 header fields the safety rules need, read without validation."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    incompatible_features: int = 0
    header_length: int = 72
    #: Name in the external data file extension, if one is present (decoded leniently).
    data_file_extension: str | None = None


def qcow2_fields(head: bytes) -> Qcow2Fields:
    """Read the qcow2 header fields from the first bytes of the file, leniently.

    Raises :class:`FormatError` for a bad magic and :class:`TruncatedImage` when the
    header is shorter than its version needs.
    """
    raw = qcow2_header.HEADER_V2.parse(head, 0)
    if raw.magic != qcow2_header.QCOW_MAGIC:
        raise FormatError("not a qcow2 image (bad magic)", structure="qcow2 header", offset=0)
    if raw.version == 1:
        # Legacy QCOW: a format of its own (qcowlib.formats.qcow), not a qcow2 header.
        raise FormatError(
            "a legacy QCOW (version 1) image, not qcow2", structure="qcow2 header", offset=4
        )
    fields = Qcow2Fields(
        version=raw.version,
        backing_file_offset=raw.backing_file_offset,
        backing_file_size=raw.backing_file_size,
        cluster_bits=raw.cluster_bits,
        size=raw.size,
        crypt_method=raw.crypt_method,
    )
    if raw.version < 3:
        return fields
    v3 = qcow2_header.HEADER_V3_TAIL.parse(head[72:], 72)
    data_file = _qcow2_data_file_extension(head, v3.header_length, raw)
    return Qcow2Fields(
        version=raw.version,
        backing_file_offset=raw.backing_file_offset,
        backing_file_size=raw.backing_file_size,
        cluster_bits=raw.cluster_bits,
        size=raw.size,
        crypt_method=raw.crypt_method,
        incompatible_features=v3.incompatible_features,
        header_length=v3.header_length,
        data_file_extension=data_file,
    )


def _qcow2_data_file_extension(head: bytes, header_length: int, raw: Any) -> str | None:
    """The external data file name from the extension list, walked leniently: where the
    list is broken, no name (the structure rule reports the parser's refusal)."""
    if header_length < 104 or header_length % 8:
        return None
    limit = len(head)
    if 9 <= raw.cluster_bits <= 21:
        limit = min(limit, 1 << raw.cluster_bits)
    if raw.backing_file_offset and raw.backing_file_offset < limit:
        limit = raw.backing_file_offset
    walk = qcow2_extensions.walk_extensions(head, header_length, limit)
    try:
        for offset, ext_type, length in itertools.islice(walk, _QCOW_MAX_EXTENSIONS):
            if ext_type == QCOW_EXT_DATA_FILE:
                name = head[offset + 8 : offset + 8 + length].split(b"\0", 1)[0]
                return name.decode("utf-8", "replace")
    except CorruptImage:
        pass
    return None


# ---------------------------------------------------------------------------------------
# LUKS

# The layouts are the LUKS reader's (formats/luks/codec.py, imported when a LUKS header
# is parsed); validate judges them its way.


@record
class LuksHeader:
    version: int
    cipher: str
    payload_offset: int
    key_bytes: int
    active_slots: int
    problems: tuple[Problem, ...]


def parse_luks_header(data: bytes, file_size: int) -> LuksHeader:
    """Parse a LUKS header: version 1 fully, version 2 only its magic and version."""
    if len(data) < 8 or data[:6] != LUKS_MAGIC:
        raise FormatError("LUKS magic is missing", structure="luks header", offset=0)
    version = int.from_bytes(data[6:8], "big")
    if version != 1:
        return LuksHeader(version, "", 0, 0, 0, ())
    from qcowlib.formats.luks import codec as luks

    h = luks.HEADER.parse(data, 0)
    at, step = luks.HEADER.sizeof(), luks.KEY_SLOT.sizeof()
    key_slots = [
        luks.KEY_SLOT.parse(data[at + i * step :], at + i * step) for i in range(luks.KEY_SLOTS)
    ]
    problems: list[Problem] = []
    if h.key_bytes not in (16, 24, 32, 48, 64):
        problems.append(Problem(f"LUKS master key length {h.key_bytes} is invalid", 108))
    slots = [s for s in key_slots if s.active == luks.KEY_ENABLED]
    for i, s in enumerate(key_slots):
        if s.active not in (luks.KEY_ENABLED, luks.KEY_DISABLED):
            problems.append(Problem(f"LUKS key slot {i} has an invalid state", 208 + 48 * i))
    if not slots:
        problems.append(Problem("LUKS header has no active key slot", 208))
    if h.payload_offset * SECTOR > file_size:
        problems.append(Problem("LUKS payload offset is past the end of the file", 104))
    cipher = f"{_cstr(h.cipher_name)}-{_cstr(h.cipher_mode)}"
    return LuksHeader(version, cipher, h.payload_offset, h.key_bytes, len(slots), tuple(problems))


# ---------------------------------------------------------------------------------------
# MBR and GPT

MBR_SIGNATURE: Final = b"\x55\xaa"
MBR_PTE_START: Final = 446
MBR_TYPE_GPT_PROTECTIVE: Final = 0xEE
_MbrEntry = FixedLayout(
    "mbr partition entry",
    "<",
    [
        ("boot", "B"),
        ("start_chs", "3s"),
        ("os_type", "B"),
        ("end_chs", "3s"),
        ("start_lba", "I"),
        ("size_lba", "I"),
    ],
)


@record
class MbrPartition:
    index: int
    boot: int
    start_chs: bytes
    os_type: int
    start_lba: int
    size_lba: int


def has_mbr_signature(sector0: bytes) -> bool:
    return len(sector0) >= SECTOR and sector0[510:512] == MBR_SIGNATURE


def looks_like_fat(sector0: bytes) -> bool:
    """A FAT volume boot record: two FATs and the fixed-disk media descriptor.

    The image inspector excludes these from its GPT/MBR detection.
    """
    return len(sector0) >= SECTOR and sector0[0x10] == 2 and sector0[0x15] == 0xF8


def parse_mbr(sector0: bytes) -> tuple[MbrPartition, ...]:
    """The four primary partition entries (all of them, including empty ones)."""
    if len(sector0) < SECTOR:
        raise TruncatedImage("MBR is truncated", structure="mbr", offset=0)
    out = []
    for i in range(4):
        at = MBR_PTE_START + 16 * i
        e = _MbrEntry.parse(sector0[at : at + 16], at)
        out.append(MbrPartition(i, e.boot, e.start_chs, e.os_type, e.start_lba, e.size_lba))
    return tuple(out)


def mbr_problems(parts: tuple[MbrPartition, ...]) -> list[Problem]:
    """The image inspector's ``mbr`` safety check on the partition table."""
    problems: list[Problem] = []
    used = []
    gpt = False
    for p in parts:
        at = MBR_PTE_START + 16 * p.index
        if p.boot not in (0x00, 0x80):
            problems.append(Problem(f"MBR partition {p.index} has an invalid boot flag", at))
        if p.os_type != 0:
            used.append(p.index)
        if p.os_type == MBR_TYPE_GPT_PROTECTIVE:
            gpt = True
            if p.start_chs != b"\x00\x02\x00":
                problems.append(Problem("protective MBR has an invalid start CHS", at + 1))
            if p.start_lba != 1:
                problems.append(Problem("protective MBR does not start at LBA 1", at + 8))
    if gpt and used != [0]:
        problems.append(Problem("protective MBR defines partitions besides the GPT one"))
    if not used:
        problems.append(Problem("MBR defines no partitions"))
    return problems


GPT_SIGNATURE: Final = b"EFI PART"
GPT_MAX_ENTRIES: Final = 1024
GPT_MAX_ENTRY_ARRAY: Final = 128 * 1024
_GptHeader = FixedLayout(
    "gpt header",
    "<",
    [
        ("signature", "8s"),
        ("revision", "I"),
        ("header_size", "I"),
        ("header_crc32", "I"),
        ("reserved", "I"),
        ("my_lba", "Q"),
        ("alternate_lba", "Q"),
        ("first_usable_lba", "Q"),
        ("last_usable_lba", "Q"),
        ("disk_guid", "16s"),
        ("partition_entry_lba", "Q"),
        ("num_partition_entries", "I"),
        ("partition_entry_size", "I"),
        ("partition_entry_array_crc32", "I"),
    ],
)


@record
class GptHeader:
    my_lba: int
    alternate_lba: int
    partition_entry_lba: int
    num_partition_entries: int
    partition_entry_size: int
    partition_entry_array_crc32: int
    problems: tuple[Problem, ...]

    @property
    def entry_array_length(self) -> int:
        return self.num_partition_entries * self.partition_entry_size


def parse_gpt_header(block: bytes, block_size: int, disk_size: int) -> GptHeader:
    """Parse and check a GPT header found at LBA 1 (UEFI 2.10 section 5.3.2)."""
    at = block_size
    h = _GptHeader.parse(block, at)
    if h.signature != GPT_SIGNATURE:
        raise FormatError("GPT header signature 'EFI PART' is missing", structure="gpt", offset=at)
    problems: list[Problem] = []
    if not 92 <= h.header_size <= block_size:
        problems.append(Problem(f"GPT header size {h.header_size} is invalid", at + 12))
    else:
        raw = bytearray(block[: h.header_size])
        raw[16:20] = bytes(4)
        import zlib

        if zlib.crc32(bytes(raw)) != h.header_crc32:
            problems.append(Problem("GPT header CRC32 is wrong", at + 16))
    if h.my_lba != 1:
        problems.append(Problem(f"GPT header says it is at LBA {h.my_lba}, not 1", at + 24))
    last_lba = disk_size // block_size - 1
    if h.alternate_lba > last_lba:
        problems.append(Problem("GPT backup header lies past the end of the disk", at + 32))
    if h.first_usable_lba > h.last_usable_lba or h.last_usable_lba > last_lba:
        problems.append(Problem("GPT usable LBA range is invalid", at + 40))
    if h.partition_entry_size < 128 or h.partition_entry_size % 8:
        problems.append(
            Problem(f"GPT partition entry size {h.partition_entry_size} is invalid", at + 84)
        )
    if h.num_partition_entries > GPT_MAX_ENTRIES:
        problems.append(
            Problem(f"GPT declares {h.num_partition_entries} partition entries", at + 80)
        )
    if h.partition_entry_lba < 2 or h.partition_entry_lba > last_lba:
        problems.append(Problem("GPT partition entry array LBA is invalid", at + 72))
    return GptHeader(
        my_lba=h.my_lba,
        alternate_lba=h.alternate_lba,
        partition_entry_lba=h.partition_entry_lba,
        num_partition_entries=h.num_partition_entries,
        partition_entry_size=h.partition_entry_size,
        partition_entry_array_crc32=h.partition_entry_array_crc32,
        problems=tuple(problems),
    )


# ---------------------------------------------------------------------------------------
# ISO 9660

ISO_DESCRIPTORS_AT: Final = 0x8000
ISO_DESCRIPTOR_SIZE: Final = 2048
#: Volume descriptors walked before giving up on finding the set terminator.
ISO_MAX_DESCRIPTORS: Final = 64
#: The primary volume descriptor's fields validate reads: volume space size and logical
#: block size, each recorded little- then big-endian (ECMA-119 8.4.8, 8.4.12).
_ISO_PVD_MIN: Final = 132


@record
class IsoVolume:
    volume_size: int
    problems: tuple[Problem, ...]


def parse_iso_descriptors(area: bytes, file_size: int) -> IsoVolume:
    """Walk the volume descriptor set from 0x8000 (``area`` starts at 0x8000).

    Raises :class:`FormatError` when there is no primary volume descriptor.
    """
    problems: list[Problem] = []
    primary = None
    terminated = False
    for i in range(ISO_MAX_DESCRIPTORS):
        block = area[i * ISO_DESCRIPTOR_SIZE : (i + 1) * ISO_DESCRIPTOR_SIZE]
        if len(block) < 7:
            break
        at = ISO_DESCRIPTORS_AT + i * ISO_DESCRIPTOR_SIZE
        if block[1:6] != b"CD001":
            problems.append(Problem("ISO 9660 volume descriptor identifier is missing", at + 1))
            break
        if block[0] == 255:
            terminated = True
            break
        if block[0] == 1 and primary is None:
            if len(block) < _ISO_PVD_MIN:
                raise TruncatedImage(
                    "iso primary volume descriptor is truncated",
                    structure="iso primary volume descriptor",
                    offset=at,
                )
            primary = block, at
    if primary is None:
        raise CorruptImage(
            "ISO 9660 image has no primary volume descriptor",
            structure="iso",
            offset=ISO_DESCRIPTORS_AT,
        )
    if not terminated:
        problems.append(Problem("ISO 9660 volume descriptor set has no terminator", fatal=False))
    pvd, at = primary
    space_le, space_be = int.from_bytes(pvd[80:84], "little"), int.from_bytes(pvd[84:88], "big")
    bs, bs_be = int.from_bytes(pvd[128:130], "little"), int.from_bytes(pvd[130:132], "big")
    if space_le != space_be or bs != bs_be:
        problems.append(Problem("ISO 9660 both-endian fields disagree", at + 80))
    if bs not in (512, 1024, 2048):
        problems.append(Problem(f"ISO 9660 logical block size {bs} is invalid", at + 128))
    size = space_le * bs
    if size > file_size:
        problems.append(
            Problem(f"ISO 9660 volume is {size} bytes but the file has only {file_size}", at + 80)
        )
    return IsoVolume(size, tuple(problems))


# ---------------------------------------------------------------------------------------
# what the OpenStack image inspector sees


#: The inspector's names where they differ from qemu-img's.
INSPECTOR_TO_QEMU: Final = {"vhd": "vpc"}
QEMU_TO_INSPECTOR: Final = {"vpc": "vhd"}
#: Formats the inspector knows (``format_inspector.ALL_FORMATS``).
INSPECTOR_FORMATS: Final = (
    "raw",
    "qcow2",
    "vhd",
    "vhdx",
    "vmdk",
    "vdi",
    "qed",
    "iso",
    "gpt",
    "luks",
)
_ISO_IDENTIFIERS: Final = (b"CD001", b"NSR02", b"NSR03")
# The magics as the inspector compares them (its own view; the codecs, with construct,
# are loaded only for the format an image turns out to be).
_VHD_COOKIE: Final = b"conectix"
_VHDX_SIGNATURE: Final = b"vhdxfile"
_VDI_SIGNATURE: Final = struct.pack("<I", 0xBEDA107F)
_VMDK4_MAGIC: Final = b"KDMV"
#: How much of a stand-alone descriptor the inspector parses: the first chunk it is
#: handed.  64 KiB is what Glance's upload path hands it in practice.
_INSPECTOR_CHUNK: Final = 64 * 1024


@record
class InspectorView:
    """The formats the image inspector matches, and the one Glance then picks.

    ``format`` is None when several formats match (Glance refuses the upload), except
    that ``iso`` with ``gpt`` is ``iso`` (bootable ISOs carry an MBR).
    """

    matches: tuple[str, ...]
    format: str | None


def inspector_view(head: bytes, size: int) -> InspectorView:
    """Which formats the image inspector sees in a file (``head``: its first 64 KiB)."""
    matches = []
    sector0 = bytes(head[:SECTOR])
    if size >= SECTOR and sector0[:4] == qcow2_header.QCOW_MAGIC:
        matches.append("qcow2")
    if size >= SECTOR and sector0[:4] == b"QED\x00":
        matches.append("qed")
    if head[:8] == _VHD_COOKIE:
        matches.append("vhd")
    if head[:8] == _VHDX_SIGNATURE:
        matches.append("vhdx")
    if _inspector_vmdk(head, size):
        matches.append("vmdk")
    if size >= SECTOR and head[0x40:0x44] == _VDI_SIGNATURE:
        matches.append("vdi")
    if size >= 34 * 1024 and head[0x8001:0x8006] in _ISO_IDENTIFIERS:
        matches.append("iso")
    if size >= SECTOR and has_mbr_signature(sector0) and not looks_like_fat(sector0):
        matches.append("gpt")
    if head[:6] == LUKS_MAGIC:
        matches.append("luks")
    if set(matches) == {"iso", "gpt"}:
        return InspectorView(tuple(matches), "iso")
    if len(matches) > 1:
        return InspectorView(tuple(matches), None)
    return InspectorView(tuple(matches), matches[0] if matches else "raw")


def _inspector_vmdk(head: bytes, size: int) -> bool:
    if size < 64:
        return False
    if head[:4] == _VMDK4_MAGIC:
        return True
    first = bytes(head[:SECTOR])
    try:
        text = first.decode("ascii")
    except UnicodeDecodeError:
        return False
    if not all(c.isprintable() or c.isspace() for c in text):
        return False
    desc = bytes(head[:_INSPECTOR_CHUNK]).split(b"\0", 1)[0]
    try:
        return 'createtype="' in desc.decode("ascii").lower()
    except UnicodeDecodeError:
        return False
