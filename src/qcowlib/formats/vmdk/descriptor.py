"""VMDK text descriptor (VDF 3): parsing, checks and building."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from qcowlib.errors import (
    CorruptImage,
    FormatError,
    QcowlibError,
    UnsupportedFeature,
)
from qcowlib.formats.vmdk.header import VMDK_CAPACITY_MAX, VMDK_DESC_MAX, VMDK_MAX_EXTENTS

if TYPE_CHECKING:
    # numpy is imported where tables are decoded, so that header work stays light.
    import numpy as np
    import numpy.typing as npt

    U32 = npt.NDArray[np.uint32]
    I64 = npt.NDArray[np.int64]


# ---------------------------------------------------------------------------------------
# text descriptor


@dataclass(frozen=True)
class VmdkExtent:
    """One extent line: ``ACCESS SECTORS TYPE ["FILENAME" [OFFSET]]`` (VDF 3.2)."""

    access: str
    sectors: int | None
    type: str
    filename: str | None
    line: int
    #: FLAT extents: where the extent's data starts in its file, in sectors.
    offset: int | None = None


@dataclass(frozen=True)
class VmdkDescriptor:
    """What a VMDK text descriptor declares, as QEMU and the image inspector read it."""

    fields: tuple[tuple[str, str], ...]
    extents: tuple[VmdkExtent, ...]
    #: Lines the image inspector refuses ("Invalid VMDK descriptor data"), with numbers.
    unsupported_lines: tuple[tuple[int, str], ...]
    #: Extent lines containing ``/`` (the inspector refuses them: they can name any path).
    slash_extent_lines: tuple[tuple[int, str], ...]
    #: The disk database: ``ddb.*`` entries (names without quotes, values unquoted).
    ddb: tuple[tuple[str, str], ...] = ()
    #: The extents QEMU's ``vmdk_parse_extents`` opens, in order (see :func:`qemu_extents`).
    read_extents: tuple[VmdkExtent, ...] = ()
    #: The first line QEMU refuses (``Invalid extent line``), or one it would read twice.
    extent_problem: tuple[int, str, str] | None = None
    #: Where the first byte that is not ASCII is (from the start of the text), if any:
    #: QEMU reads such a descriptor (VMware writes non-ASCII file names and ddb values
    #: in the encoding it declares), the image inspector refuses it.
    non_ascii_at: int | None = None

    def field(self, name: str) -> str | None:
        """A header field's value, name matched case-insensitively (last one wins)."""
        value = None
        for key, val in self.fields:
            if key.lower() == name.lower():
                value = val
        return value

    def ddb_value(self, name: str) -> str | None:
        """A disk database value (``name`` with or without ``ddb.``; last one wins)."""
        if not name.lower().startswith("ddb."):
            name = "ddb." + name
        value = None
        for key, val in self.ddb:
            if key.lower() == name.lower():
                value = val
        return value

    @property
    def create_type(self) -> str | None:
        return self.field("createType")

    @property
    def parent_file_name_hint(self) -> str | None:
        return self.field("parentFileNameHint")

    @property
    def cid(self) -> int | None:
        return _hex32(self.field("CID"))

    @property
    def parent_cid(self) -> int | None:
        return _hex32(self.field("parentCID"))

    @property
    def adapter_type(self) -> str | None:
        return self.ddb_value("adapterType")

    @property
    def virtual_hw_version(self) -> str | None:
        return self.ddb_value("virtualHWVersion")


def _hex32(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value, 16)
    except ValueError:
        return None
    return n if 0 <= n <= 0xFFFFFFFF else None


_EXTENT_ACCESS: Final = ("rw", "rdonly", "noaccess")
_EXTENT_RE = re.compile(
    r"^(?P<access>\S+)\s+(?P<sectors>\S+)\s+(?P<type>\S+)"
    r'(?:\s+"(?P<name>[^"\r\n]*)"(?:\s+(?P<off>\S+))?)?'
)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def parse_descriptor(raw: bytes | bytearray | memoryview) -> VmdkDescriptor:
    """Parse a text descriptor (embedded or stand-alone), at most 1 MiB of it (VDF 3).

    The text ends at the first NUL byte (embedded descriptors are NUL padded).  Lines
    are kept as found; :mod:`qcowlib.formats.vmdk.reader` decides what it opens.  Text
    that is not ASCII is read as QEMU reads it (see ``non_ascii_at``).
    """
    data = bytes(raw[:VMDK_DESC_MAX]).split(b"\0", 1)[0]
    # Bytes, as QEMU reads them: whatever is not UTF-8 is kept as surrogates, so that a
    # file name in another encoding still names the file it names on disk.
    text = data.decode("utf-8", "surrogateescape")
    odd = None if data.isascii() else re.search(rb"[\x80-\xff]", data)
    fields: list[tuple[str, str]] = []
    extents: list[VmdkExtent] = []
    unsupported: list[tuple[int, str]] = []
    slash: list[tuple[int, str]] = []
    ddb: list[tuple[str, str]] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        lower = line.lower()
        first_word = lower.split(" ")[0]
        if lower.startswith("ddb"):
            key, eq, value = line.partition("=")
            if eq and len(ddb) < VMDK_MAX_EXTENTS:
                ddb.append((_unquote(key), _unquote(value)))
            continue
        if "=" in line and " " not in line.split("=")[0]:
            key, _, value = line.partition("=")
            fields.append((key.strip(), _unquote(value)))
            continue
        if first_word in _EXTENT_ACCESS:
            if "/" in line:
                slash.append((number, line))
            if len(extents) < VMDK_MAX_EXTENTS:
                extents.append(_extent(line, number))
            continue
        # QEMU also reads "key = value" with spaces; the inspector refuses such lines.
        if "=" in line and " " not in line.split("=")[0].strip():
            key, _, value = line.partition("=")
            fields.append((key.strip(), _unquote(value)))
        unsupported.append((number, line))
    read, problem = qemu_extents(text)
    return VmdkDescriptor(
        tuple(fields),
        tuple(extents),
        tuple(unsupported),
        tuple(slash),
        tuple(ddb),
        read,
        problem,
        None if odd is None else odd.start(),
    )


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _extent(line: str, number: int) -> VmdkExtent:
    match = _EXTENT_RE.match(line)
    if match is None:
        return VmdkExtent(line.split(maxsplit=1)[0].upper(), None, "", None, number)
    return VmdkExtent(
        match.group("access").upper(),
        _int_or_none(match.group("sectors")),
        match.group("type").upper(),
        match.group("name"),
        number,
        _int_or_none(match.group("off")),
    )


#: createType values a stand-alone descriptor may have (QEMU's ``vmdk_open_desc_file``).
DESCRIPTOR_TYPES: Final = (
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
)
#: Extent types QEMU opens; lines of other types (ZERO, VMFSRDM, VMFSRAW, ...) are
#: skipped, as are lines whose access is not ``RW`` (RDONLY, NOACCESS).
EXTENT_TYPES: Final = ("FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE")
#: Extent types whose file holds data only (no grain tables).
FLAT_TYPES: Final = ("FLAT", "VMFS")


def qemu_extents(text: str) -> tuple[tuple[VmdkExtent, ...], tuple[int, str, str] | None]:
    """The extents QEMU 7.2's ``vmdk_parse_extents`` opens from descriptor ``text``.

    Lines are matched by :func:`~qcowlib.formats.vmdk.extent_lines.scan_extent_line`;
    lines with fewer than 4 fields, an access other than ``RW``, a size of 0 or less or
    an unknown type are skipped.  A ``FLAT`` line needs an offset, a ``VMFS`` line has
    none (offset 0), other types have none.  Returns the extents and the first problem
    as ``(line, text, message)``: QEMU's ``Invalid extent line``, or an extent line
    after a blank line, which QEMU reads twice (its conversion skips the newline) and
    qcowlib refuses rather than guess.
    """
    from qcowlib.formats.vmdk.extent_lines import line_starts, scan_extent_line

    found: list[VmdkExtent] = []
    for number, p in enumerate(line_starts(text), 1):
        m = scan_extent_line(text, p)
        if m.matched < 4 or m.access != "RW":
            continue
        end = text.find("\n", p)
        line = text[p : len(text) if end == -1 else end].rstrip("\r")
        offset = m.offset
        if m.type == "FLAT":
            valid = m.matched == 5 and offset is not None and offset >= 0
        elif m.type == "VMFS":
            valid, offset = m.matched == 4, 0
        else:
            valid = m.matched == 4
        if not valid:
            return tuple(found), (number, line, f"Invalid extent line: {line}")
        assert m.sectors is not None and m.type is not None
        if m.sectors <= 0 or m.type not in EXTENT_TYPES:
            continue
        if "\n" in text[p : m.first]:
            shown = text[m.first : text.find("\n", m.first)].strip()
            return tuple(found), (
                number,
                shown,
                f"extent line {shown!r} follows a blank line: qemu-img 7.2 reads such a "
                "line twice (once from the blank line), so the disk is ambiguous",
            )
        if len(found) >= VMDK_MAX_EXTENTS:
            return tuple(found), (number, line, f"more than {VMDK_MAX_EXTENTS} extents")
        found.append(VmdkExtent("RW", m.sectors, m.type, m.name, number, offset))
    return tuple(found), None


def descriptor_problems(desc: VmdkDescriptor) -> list[QcowlibError]:
    """What QEMU's ``vmdk_open_desc_file`` and ``vmdk_parse_extents`` refuse, in order.

    For a descriptor read as the disk (a stand-alone descriptor, or the embedded one of
    a sparse extent of capacity 0): :class:`FormatError` without a createType,
    :class:`UnsupportedFeature` for a createType QEMU does not open (QEMU's
    ``Unsupported image type``), :class:`CorruptImage` for an invalid extent line (see
    :func:`qemu_extents`), no extent QEMU opens, or a disk too large.  The extent files
    themselves are the caller's to open and check.
    """
    what = "vmdk descriptor"
    found: list[QcowlibError] = []
    ct = desc.create_type
    if ct is None:
        found.append(FormatError("invalid VMDK image descriptor (no createType)", structure=what))
    elif ct not in DESCRIPTOR_TYPES:
        found.append(
            UnsupportedFeature(f"Unsupported image type '{ct}'", structure=what, field="createType")
        )
    if desc.extent_problem is not None:
        number, _, message = desc.extent_problem
        found.append(CorruptImage(message, structure=what, field=f"extent line {number}"))
    elif not desc.read_extents:
        found.append(CorruptImage("VMDK descriptor names no extents", structure=what))
    sectors = 0
    for ext in desc.read_extents:
        assert ext.sectors is not None
        sectors += ext.sectors if ext.type in FLAT_TYPES else 0
        if sectors > VMDK_CAPACITY_MAX:
            where = f"extent line {ext.line}"
            found.append(CorruptImage(f"{where}: disk too large", structure=what, field=where))
            break
    return found


def check_descriptor(desc: VmdkDescriptor) -> None:
    """Raise the first of :func:`descriptor_problems`."""
    problems = descriptor_problems(desc)
    if problems:
        raise problems[0]


def build_descriptor(
    *,
    create_type: str,
    extents: list[tuple[str, int, str, str | None, int | None]],
    cid: int,
    parent_cid: int = 0xFFFFFFFF,
    ddb: list[tuple[str, str]] | None = None,
) -> bytes:
    """A descriptor as QEMU writes it (VDF 3): header, extent lines, disk database.

    ``extents`` are ``(access, sectors, type, filename, offset)``; ``ddb`` entries are
    ``(name, value)`` with names starting ``ddb.`` (``ddb.adapterType``,
    ``ddb.virtualHWVersion``, ...).  Raises :class:`CorruptImage` for names or values
    that would not read back (quotes, newlines, non-ASCII).
    """
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        f"CID={cid:08x}",
        f"parentCID={parent_cid:08x}",
        f'createType="{_safe(create_type)}"',
        "",
        "# Extent description",
    ]
    for access, sectors, etype, name, off in extents:
        line = f"{_safe(access)} {sectors} {_safe(etype)}"
        if name is not None:
            line += f' "{_safe(name)}"'
            if off is not None:
                line += f" {off}"
        lines.append(line)
    lines += ["", "# The Disk Data Base", "#DDB", ""]
    for key, value in ddb or []:
        lines.append(f'{_safe(key)} = "{_safe(value)}"')
    return ("\n".join(lines) + "\n").encode("ascii")


def _safe(text: str) -> str:
    if not text.isascii() or any(c in text for c in '"\r\n\0'):
        raise CorruptImage(f"cannot put {text!r} in a VMDK descriptor", structure="vmdk descriptor")
    return text
