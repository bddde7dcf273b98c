"""The structures of one image, read once through the format codecs and shared by rules.

Every header value comes from :mod:`qcowlib.formats` (``vmdk``, ``vhd``, ``vhdx``,
``vdi``), with the checks the readers apply when they open the image: a problem the
reader would refuse the image for is a fatal :class:`~qcowlib.validate.formats.Problem`
here, with the reader's own message.  What validate adds on top (warnings QEMU does not
care about, Glance's own checks) is marked as such where it is computed.

Only the image file is read, through :meth:`Context.read`: a backing file, a parent or
an extent file named inside the image is reported by the rules, never opened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from qcowlib._frozen import record
from qcowlib.errors import CorruptImage, FormatError, QcowlibError
from qcowlib.validate.engine import Context
from qcowlib.validate.formats import (
    ISO_DESCRIPTOR_SIZE,
    ISO_DESCRIPTORS_AT,
    ISO_MAX_DESCRIPTORS,
    SECTOR,
    IsoVolume,
    LuksHeader,
    Problem,
    parse_iso_descriptors,
    parse_luks_header,
)

if TYPE_CHECKING:
    from qcowlib.formats.parallels import codec as parallels
    from qcowlib.formats.qcow import codec as qcow
    from qcowlib.formats.qed import codec as qed
    from qcowlib.formats.vdi import codec as vdi
    from qcowlib.formats.vhd import codec as vhd
    from qcowlib.formats.vhdx import codec as vhdx
    from qcowlib.formats.vmdk import codec as vmdk


__all__ = [
    "VhdInfo",
    "VhdxInfo",
    "VmdkInfo",
    "declared_virtual_size",
    "iso_volume",
    "luks_header",
    "parallels_header",
    "qcow1_header",
    "qed_header",
    "vdi_header",
    "vdi_is_differencing",
    "vhd_info",
    "vhdx_info",
    "vmdk_info",
]

#: Cap on a VHDX metadata item read (the known ones are at most 16 bytes).
_VHDX_MAX_ITEM = 4096


# ---------------------------------------------------------------------------------------
# VMDK


@record
class VmdkInfo:
    """A VMDK as found: ``kind`` is ``sparse`` (KDMV), ``cowd`` or ``descriptor``.

    ``header`` is the header at offset 0 (a stream's real one may be in its footer).
    """

    kind: str
    header: vmdk.SparseExtentHeader | None
    descriptor: vmdk.VmdkDescriptor | None
    descriptor_error: QcowlibError | None

    @property
    def followed(self) -> bool:
        """Whether opening reads the descriptor as the disk and so opens its extents:
        a stand-alone descriptor, or a sparse header of capacity 0 with an embedded
        descriptor (QEMU reads it as a descriptor)."""
        h = self.header
        return self.kind == "descriptor" or (
            h is not None and h.capacity == 0 and bool(h.desc_offset)
        )


def vmdk_info(ctx: Context) -> VmdkInfo:
    return ctx.cached("vmdk", lambda: _parse_vmdk(ctx))


def _parse_vmdk(ctx: Context) -> VmdkInfo:
    from qcowlib.formats.vmdk import codec as vmdk

    head = ctx.head
    if head[:4] == vmdk.VMDK3_MAGIC:
        return VmdkInfo("cowd", None, None, None)
    if head[:4] == vmdk.VMDK4_MAGIC:
        header = vmdk.decode_header(head[:SECTOR])
        offset, length = header.descriptor_range
        if not header.desc_offset or not length:
            return VmdkInfo("sparse", header, None, None)
        raw = ctx.read(offset, length)
        kind = "sparse"
    else:
        header = None
        raw = ctx.read(0, vmdk.VMDK_DESC_MAX)
        kind = "descriptor"
    try:
        return VmdkInfo(kind, header, vmdk.parse_descriptor(raw), None)
    except QcowlibError as exc:
        return VmdkInfo(kind, header, None, exc)


# ---------------------------------------------------------------------------------------
# VHD (vpc)


@record
class VhdInfo:
    """A VHD's footer (the one QEMU uses), its dynamic header and what is wrong."""

    footer: vhd.Footer
    footer_at: int
    #: The guest-visible size as QEMU opens it (None when it refuses the size).
    virtual_size: int | None
    dynamic: vhd.DynamicHeader | None
    problems: tuple[Problem, ...]

    @property
    def differencing(self) -> bool:
        from qcowlib.formats.vhd import codec as vhd

        return self.footer.type == vhd.VHD_TYPE_DIFFERENCING

    @property
    def parent_name(self) -> str:
        return self.dynamic.parent_name_text if self.dynamic is not None else ""


def vhd_info(ctx: Context) -> VhdInfo:
    """Raises what :func:`qcowlib.formats.vhd.codec.locate_footer` raises (no footer, bad
    checksum): the reader refuses such a file outright."""

    return ctx.cached("vpc", lambda: _parse_vhd(ctx))


def _parse_vhd(ctx: Context) -> VhdInfo:
    from qcowlib.formats.vhd import codec as vhd

    footer, at = vhd.locate_footer(ctx.head[: vhd.FOOTER_SIZE], ctx.tail, ctx.size)
    problems: list[Problem] = []
    if footer.type != vhd.VHD_TYPE_DIFFERENCING:  # backing-file reports those
        problems += map(Problem.of, vhd.footer_problems(footer, at))
    if at == 0 and (ctx.size < 2 * vhd.FOOTER_SIZE or ctx.tail[:8] != vhd.VHD_COOKIE):
        # QEMU reads a dynamic disk from its footer copy; validate only warns.
        problems.append(
            Problem("VHD has no footer at its end: the file may be truncated", None, False)
        )
    size: int | None = None
    try:
        size = vhd.virtual_size(footer, at)
    except QcowlibError as exc:
        problems.append(Problem.of(exc))
    dynamic = None
    if footer.type == vhd.VHD_TYPE_FIXED:
        # Stricter than QEMU, which reads the missing part as zeros.
        if footer.current_size > ctx.size - vhd.FOOTER_SIZE:
            problems.append(
                Problem(
                    f"fixed VHD declares {footer.current_size} bytes but the file holds only "
                    f"{max(0, ctx.size - vhd.FOOTER_SIZE)} before its footer",
                    at + 48,
                )
            )
    elif footer.type in (vhd.VHD_TYPE_DYNAMIC, vhd.VHD_TYPE_DIFFERENCING):
        try:
            dyn_at = vhd.dynamic_header_offset(footer, ctx.size)
            raw = ctx.read(dyn_at, vhd.DYNAMIC_HEADER_SIZE)
            dynamic = vhd.parse_dynamic_header(raw, dyn_at)
        except QcowlibError as exc:
            problems.append(Problem.of(exc))
        else:
            if size is not None:
                problems += map(Problem.of, vhd.dynamic_problems(dynamic, size, ctx.size, dyn_at))
            if dynamic.checksum != vhd.dynamic_header_checksum(raw):
                # QEMU does not check it either.
                problems.append(Problem("VHD dynamic header checksum is wrong", dyn_at + 36, False))
    return VhdInfo(footer, at, size, dynamic, tuple(problems))


# ---------------------------------------------------------------------------------------
# VHDX


@record
class VhdxInfo:
    """What a VHDX's header section and metadata say, and what is wrong with them."""

    virtual_size: int | None
    has_parent: bool
    parent: dict[str, str]
    problems: tuple[Problem, ...]
    #: The decoded metadata and the BAT region (entries, offset) when both are sound.
    metadata: vhdx.Metadata | None = None
    bat: tuple[int, int] | None = None
    #: Offset of the current header (its log GUID is at +48).
    header_at: int = 0x10000  # the first header (vhdx.VHDX_HEADER_OFFSETS[0])


def vhdx_info(ctx: Context) -> VhdxInfo:
    """Raises what the codecs raise when no header, region table or metadata table can
    be read at all: the reader refuses such a file outright."""
    return ctx.cached("vhdx", lambda: _parse_vhdx(ctx))


def _vhdx_log_problems(ctx: Context, header: vhdx.Header, header_at: int) -> list[Problem]:
    """The log as QEMU's ``vhdx_parse_log`` judges it: entries to replay refuse the image
    (QEMU will not open it read-only), a log GUID without a valid entry is only noted."""
    from qcowlib.formats.vhdx import log as vhdx_log

    present = header.log_needs_replay and header.log_length != 0
    try:
        vhdx_log.check_log_fields(
            header.log_offset, header.log_length, header.log_version, header_at, present=present
        )
        if not present:
            return []
        data = ctx.read_table(header.log_offset, header.log_length)
        data = data.ljust(header.log_length, b"\0")  # past the end of file reads zeros
        seq = vhdx_log.find_active_sequence(data, header.log_guid, header.log_offset)
    except QcowlibError as exc:
        return [Problem.of(exc)]
    if seq is None:
        return [
            Problem(
                "its header names a log, but the log holds no valid entry: nothing to "
                "replay (QEMU reads it as it is)",
                header_at + 48,
                fatal=False,
            )
        ]
    return [
        Problem(
            "its log has entries that were never replayed (it was not closed cleanly), "
            "so its metadata may be stale and it cannot be read safely; replay the log "
            "with `qcowlib check -r all FILE` (or `qemu-img check -r all`, or Hyper-V)",
            header.log_offset + seq.start,
        )
    ]


def _parse_vhdx(ctx: Context) -> VhdxInfo:
    from qcowlib.formats.vhdx import codec as vhdx

    area = ctx.read(0, vhdx.VHDX_HEADER_AREA)
    vhdx.parse_file_identifier(area)
    problems: list[Problem] = []
    for at in vhdx.VHDX_HEADER_OFFSETS:
        try:
            vhdx.parse_header(area[at : at + vhdx.VHDX_HEADER_SIZE], at)
        except CorruptImage as exc:  # QEMU uses the other header; validate warns
            problems.append(Problem.of(exc, fatal=False))
        except FormatError:
            pass  # no header there at all: current_header says what that means
    header, header_at = vhdx.current_header(area)
    problems += _vhdx_log_problems(ctx, header, header_at)
    regions, table_at = _vhdx_regions(area, problems)
    log = (header.log_offset, header.log_length)
    problems += map(Problem.of, vhdx.region_problems(regions, ctx.size, table_at, log))
    found = {r.guid: r for r in regions}
    meta = found.get(vhdx.VHDX_METADATA_GUID)
    if meta is None or meta.file_offset + vhdx.VHDX_METADATA_TABLE_SIZE > ctx.size:
        return VhdxInfo(None, False, {}, tuple(problems), header_at=header_at)
    base = meta.file_offset
    table = ctx.read(base, vhdx.VHDX_METADATA_TABLE_SIZE)
    entries = vhdx.parse_metadata_table(table, meta.length, base)
    items = {
        e.item_id: ctx.read(base + e.offset, min(e.length, _VHDX_MAX_ITEM))
        for e in entries
        if e.item_id in vhdx.VHDX_KNOWN_METADATA and e.item_id != vhdx.VHDX_PARENT_LOCATOR
    }
    meta_problems = vhdx.metadata_problems(entries, items, base)
    problems += map(Problem.of, meta_problems)
    if meta_problems:
        return VhdxInfo(None, False, {}, tuple(problems), header_at=header_at)
    m = vhdx.decode_metadata(entries, items, base)
    parent: dict[str, str] = {}
    locator = next((e for e in entries if e.item_id == vhdx.VHDX_PARENT_LOCATOR), None)
    if m.has_parent and locator is not None:
        raw = ctx.read(base + locator.offset, min(locator.length, vhdx.VHDX_MAX_LOCATOR))
        try:
            parent = vhdx.parse_parent_locator(raw)
        except QcowlibError:
            parent = {}
    bat = None
    bat_region = found.get(vhdx.VHDX_BAT_GUID)
    if bat_region is not None and not m.has_parent:
        try:
            bat = (vhdx.bat_size(m, bat_region), bat_region.file_offset)
        except QcowlibError as exc:
            problems.append(Problem.of(exc))
    return VhdxInfo(m.virtual_disk_size, m.has_parent, parent, tuple(problems), m, bat, header_at)


def _vhdx_regions(area: bytes, problems: list[Problem]) -> tuple[tuple[vhdx.RegionEntry, ...], int]:
    """The first region table that parses, as the reader takes it, and its offset.

    A damaged table before it is a warning.  Raises the first table's error when
    neither parses.
    """
    from qcowlib.formats.vhdx import codec as vhdx

    first: QcowlibError | None = None
    for at in vhdx.VHDX_REGION_TABLE_OFFSETS:
        try:
            return vhdx.parse_region_table(area[at : at + vhdx.VHDX_REGION_TABLE_SIZE], at), at
        except CorruptImage as exc:
            problems.append(Problem.of(exc, fatal=False))
            first = first or exc
        except QcowlibError as exc:
            first = first or exc
    assert first is not None
    raise first


# ---------------------------------------------------------------------------------------
# VDI, ISO, LUKS


def vdi_header(ctx: Context) -> vdi.VdiHeader:
    """The decoded header (values unjudged: see ``vdi.header_problems``)."""
    from qcowlib.formats.vdi import codec as vdi

    return ctx.cached("vdi", lambda: vdi.decode_header(ctx.read(0, vdi.HEADER_AREA_SIZE)))


def vdi_is_differencing(h: vdi.VdiHeader) -> bool:
    from qcowlib.formats.vdi import codec as vdi

    return h.image_type == vdi.VDI_TYPE_DIFF or h.uuid_parent.int != 0


def iso_volume(ctx: Context) -> IsoVolume:
    area = ISO_MAX_DESCRIPTORS * ISO_DESCRIPTOR_SIZE
    return ctx.cached(
        "iso", lambda: parse_iso_descriptors(ctx.read(ISO_DESCRIPTORS_AT, area), ctx.size)
    )


def luks_header(ctx: Context) -> LuksHeader:
    from qcowlib.formats.luks.codec import HEADER_SIZE

    return ctx.cached("luks", lambda: parse_luks_header(ctx.read(0, HEADER_SIZE), ctx.size))


def qcow1_header(ctx: Context) -> qcow.QcowHeader:
    """The checked legacy QCOW (v1) header (:func:`qcowlib.formats.qcow.codec.parse_header`)."""
    from qcowlib.formats.qcow import codec as qcow

    return ctx.cached("qcow1", lambda: qcow.parse_header(ctx.head[: qcow.HEADER_SIZE], ctx.size))


def qed_header(ctx: Context) -> qed.QedHeader:
    """The checked QED header (:func:`qcowlib.formats.qed.codec.parse_header`)."""
    from qcowlib.formats.qed import codec as qed

    return ctx.cached("qed", lambda: qed.parse_header(ctx.head[: qed.HEADER_SIZE], ctx.size))


def parallels_header(ctx: Context) -> parallels.ParallelsHeader:
    """The checked Parallels header (:func:`qcowlib.formats.parallels.codec.parse_header`)."""
    from qcowlib.formats.parallels import codec as parallels

    return ctx.cached(
        "parallels",
        lambda: parallels.parse_header(ctx.head[: parallels.HEADER_SIZE], ctx.size),
    )


def _qcow1_size(ctx: Context) -> int:
    """The size field of a qcow v1 header, read even where the header is refused (an
    encrypted image still declares its size)."""
    from qcowlib.formats.qcow import codec as qcow

    rec = qcow.HEADER.parse(ctx.head[: qcow.HEADER_SIZE])
    return int(rec.size) // SECTOR * SECTOR


# ---------------------------------------------------------------------------------------
# the declared size


def _vmdk_size(ctx: Context) -> int | None:
    info = vmdk_info(ctx)
    if info.header is not None and info.header.capacity:
        return info.header.capacity * SECTOR
    if info.descriptor is not None:
        return sum(e.sectors or 0 for e in info.descriptor.extents) * SECTOR
    return None


def _vdi_size(ctx: Context) -> int | None:
    from qcowlib.formats.vdi import codec as vdi

    h = vdi_header(ctx)
    return h.virtual_size if h.version == vdi.VDI_VERSION_1_1 else None


_DECLARED_SIZE: Final[dict[str, Callable[[Context], int | None]]] = {
    "qcow2": lambda ctx: ctx.qcow2_fields().size,
    "vmdk": _vmdk_size,
    "vpc": lambda ctx: vhd_info(ctx).virtual_size,
    "vhdx": lambda ctx: vhdx_info(ctx).virtual_size,
    "vdi": _vdi_size,
    "iso": lambda ctx: max(ctx.size, iso_volume(ctx).volume_size),
    "luks": lambda ctx: max(0, ctx.size - luks_header(ctx).payload_offset * SECTOR),
    "qcow": _qcow1_size,
    "qed": lambda ctx: qed_header(ctx).image_size,
    "parallels": lambda ctx: parallels_header(ctx).virtual_size,
}


def declared_virtual_size(ctx: Context) -> int | None:
    """The guest-visible size the content declares (the file size for raw).

    Raises :class:`QcowlibError` when the structure that declares it cannot be read.
    """
    size_of = _DECLARED_SIZE.get(ctx.format)
    return ctx.size if size_of is None else size_of(ctx)
