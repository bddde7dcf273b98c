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
    are kept as found; :mod:`qcowlib.formats.vmdk.reader` decides what it opens.  Raises
    :class:`CorruptImage` when the text is not ASCII, as the image inspector refuses it.
    """
    data = bytes(raw[:VMDK_DESC_MAX]).split(b"\0", 1)[0]
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise CorruptImage(
            "VMDK descriptor is not ASCII text", structure="vmdk descriptor", offset=exc.start
        ) from None
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
    return VmdkDescriptor(
        tuple(fields), tuple(extents), tuple(unsupported), tuple(slash), tuple(ddb)
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


#: createType values a stand-alone descriptor may have (QEMU's list, less VMFS).
DESCRIPTOR_TYPES: Final = ("monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
_DESCRIPTOR_ACCESS: Final = ("RW", "RDONLY")


def descriptor_problems(desc: VmdkDescriptor) -> list[QcowlibError]:
    """What QEMU's ``vmdk_open_desc_file`` and ``vmdk_parse_extents`` refuse, in order.

    For a descriptor read as the disk (a stand-alone descriptor, or the embedded one of
    a sparse extent of capacity 0): :class:`FormatError` without a createType,
    :class:`UnsupportedFeature` for another createType, too many extents or an extent
    type other than FLAT, SPARSE and ZERO, :class:`CorruptImage` for no extents, a bad
    extent line (access, size, missing file name or FLAT offset) or a disk too large.
    The extent files themselves are the caller's to open and check.
    """
    what = "vmdk descriptor"
    found: list[QcowlibError] = []
    ct = desc.create_type
    if ct is None:
        found.append(FormatError("VMDK descriptor has no createType", structure=what))
    elif ct not in DESCRIPTOR_TYPES:
        found.append(
            UnsupportedFeature(
                f"VMDK createType {ct!r} is not supported", structure=what, field="createType"
            )
        )
    if not desc.extents:
        found.append(CorruptImage("VMDK descriptor names no extents", structure=what))
    if len(desc.extents) >= VMDK_MAX_EXTENTS:
        found.append(
            UnsupportedFeature(f"more than {VMDK_MAX_EXTENTS - 1} extents", structure=what)
        )
    sectors = 0
    for ext in desc.extents:
        where = f"extent line {ext.line}"
        if ext.access not in _DESCRIPTOR_ACCESS or ext.sectors is None or ext.sectors <= 0:
            found.append(CorruptImage(f"invalid {where}", structure=what, field=where))
            continue
        sectors += ext.sectors
        if sectors > VMDK_CAPACITY_MAX:
            found.append(CorruptImage(f"{where}: disk too large", structure=what, field=where))
        if ext.type == "ZERO":
            continue
        if ext.type not in ("FLAT", "SPARSE"):
            found.append(
                UnsupportedFeature(
                    f"VMDK extent type {ext.type!r} is not supported", structure=what, field=where
                )
            )
        elif ext.filename is None:
            found.append(CorruptImage(f"{where} names no file", structure=what, field=where))
        elif ext.type == "FLAT" and (ext.offset is None or ext.offset < 0):
            found.append(
                CorruptImage(f"{where}: FLAT extent needs an offset", structure=what, field=where)
            )
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
