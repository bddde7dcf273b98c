"""qcowlib's built-in validation rules.

They use the same interface as third-party rules (:class:`~qcowlib.validate.model.Rule`
over a :class:`~qcowlib.validate.engine.Context`) and emit their findings with the
severities of the ``glance`` policy: an ``error`` for what Glance 33 refuses on upload
(``oslo_utils.imageutils.format_inspector`` safety checks and Glance's ``[image_format]``
checks) and for images that do not parse; a ``warning`` for what Glance accepts but an
operator should know.  Where qcowlib is deliberately stricter than Glance, the rule's
docstring says so (and docs/validation.md lists it).

No rule opens any file but the image: names of backing files, data files and extents
are read from the image and reported.
"""

from __future__ import annotations

import importlib
import os
import shlex
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from qcowlib.errors import FormatError, QcowlibError, UnsupportedFeature
from qcowlib.validate import formats as fm
from qcowlib.validate.engine import Context
from qcowlib.validate.model import Finding, Rule, rule

__all__ = ["BUILTIN_RULES", "declared_virtual_size"]

Findings = Iterator[Finding]

_NAMES: Final = {
    "qcow2": "qcow2",
    "vmdk": "VMDK",
    "vpc": "VHD",
    "vhdx": "VHDX",
    "vdi": "VDI",
    "iso": "ISO",
    "luks": "LUKS",
    "raw": "raw",
}
INCOMPAT_DIRTY: Final = 1 << 0
INCOMPAT_CORRUPT: Final = 1 << 1
INCOMPAT_DATA_FILE: Final = 1 << 2
INCOMPAT_EXTL2: Final = 1 << 4
#: Every incompatible feature bit QEMU 7.2 knows (dirty .. extended L2).
KNOWN_INCOMPAT: Final = 0b11111
#: qcow2.txt: backing file names are at most 1023 bytes.
MAX_BACKING_NAME: Final = 1023


# ---------------------------------------------------------------------------------------
# helpers


def _q(text: str) -> str:
    return shlex.quote(text)


def _out_name(path: str, suffix: str = "-flat.qcow2") -> str:
    base = os.path.basename(path) or "image"
    stem = base.rsplit(".", 1)[0] if "." in base[1:] else base
    directory = os.path.dirname(path)
    return os.path.join(directory, stem + suffix) if directory else stem + suffix


def _flatten_cmd(ctx: Context) -> str:
    return f"`qcowlib flatten {_q(ctx.path)} {_q(_out_name(ctx.path))}`"


def _convert_cmd(ctx: Context, tool: str = "qcowlib", fmt: str = "qcow2") -> str:
    out = _out_name(ctx.path, "-converted." + fmt)
    return f"`{tool} convert -O {fmt} {_q(ctx.path)} {_q(out)}`"


def _human(n: int) -> str:
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    value = float(n)
    unit = 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{n} bytes"
    text = f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{text} {units[unit]} ({n} bytes)"


def _name(text: str) -> str:
    """A file name from inside an image, quoted and made safe to print."""
    return repr(fm.printable(text))


def _describe(exc: QcowlibError) -> str:
    text = exc.message
    if exc.structure is not None:
        text += f" ({exc.structure}{'.' + exc.field if exc.field else ''})"
    return text


# ---------------------------------------------------------------------------------------
# per-format structures, parsed once per image and shared by the rules


@dataclass(frozen=True)
class VmdkInfo:
    """A VMDK as found: ``kind`` is ``sparse`` (KDMV), ``cowd`` or ``descriptor``."""

    kind: str
    header: fm.VmdkSparseHeader | None
    descriptor: fm.VmdkDescriptor | None
    descriptor_error: QcowlibError | None


def vmdk_info(ctx: Context) -> VmdkInfo:
    return ctx.cached("vmdk", lambda: _parse_vmdk(ctx))


def _parse_vmdk(ctx: Context) -> VmdkInfo:
    head = ctx.head
    if head[:4] == fm.VMDK3_MAGIC:
        return VmdkInfo("cowd", None, None, None)
    if head[:4] == fm.VMDK4_MAGIC:
        header = fm.parse_vmdk_sparse_header(head[: fm.SECTOR])
        offset, length = header.descriptor_range
        if not header.desc_offset or not length:
            return VmdkInfo("sparse", header, None, None)
        raw = ctx.read(offset, length)
        kind = "sparse"
    else:
        header = None
        raw = ctx.read(0, fm.VMDK_DESC_MAX)
        kind = "descriptor"
    try:
        return VmdkInfo(kind, header, fm.parse_vmdk_descriptor(raw), None)
    except QcowlibError as exc:
        return VmdkInfo(kind, header, None, exc)


@dataclass(frozen=True)
class VhdInfo:
    footer: fm.VhdFooter
    footer_at: int
    dynamic: fm.VhdDynamicHeader | None
    problems: tuple[fm.Problem, ...]


def vhd_info(ctx: Context) -> VhdInfo:
    return ctx.cached("vpc", lambda: _parse_vhd(ctx))


def _parse_vhd(ctx: Context) -> VhdInfo:
    problems: list[fm.Problem] = []
    if ctx.head[:8] == fm.VHD_COOKIE:
        footer_at = 0
        footer = fm.parse_vhd_footer(ctx.head[: fm.VHD_FOOTER_SIZE])
        no_end_footer = ctx.size < 2 * fm.VHD_FOOTER_SIZE or ctx.tail[:8] != fm.VHD_COOKIE
        if no_end_footer and footer.disk_type != fm.VHD_TYPE_FIXED:
            problems.append(
                fm.Problem("VHD has no footer at its end: the file may be truncated", None, False)
            )
    else:
        footer_at = max(0, ctx.size - fm.VHD_FOOTER_SIZE)
        footer = fm.parse_vhd_footer(ctx.tail)
    if not footer.checksum_ok:
        problems.append(fm.Problem("VHD footer checksum is wrong", footer_at + 64, fatal=False))
    dynamic = None
    if footer.disk_type == fm.VHD_TYPE_FIXED:
        if footer.current_size > ctx.size - fm.VHD_FOOTER_SIZE:
            problems.append(
                fm.Problem(
                    f"fixed VHD declares {footer.current_size} bytes but the file holds only "
                    f"{max(0, ctx.size - fm.VHD_FOOTER_SIZE)} before its footer",
                    footer_at + 48,
                )
            )
    elif footer.disk_type in (fm.VHD_TYPE_DYNAMIC, fm.VHD_TYPE_DIFFERENCING):
        at = footer.data_offset
        if at > ctx.size - fm.VHD_DYNAMIC_HEADER_SIZE:
            problems.append(fm.Problem("VHD dynamic header lies past the end of the file", at))
        else:
            try:
                dynamic = fm.parse_vhd_dynamic_header(ctx.read(at, fm.VHD_DYNAMIC_HEADER_SIZE))
            except QcowlibError as exc:
                problems.append(fm.Problem(exc.message, at))
            else:
                problems.extend(fm.vhd_dynamic_problems(footer, dynamic, ctx.size))
    else:
        problems.append(fm.Problem(f"VHD disk type {footer.disk_type} is unknown", footer_at + 60))
    return VhdInfo(footer, footer_at, dynamic, tuple(problems))


@dataclass(frozen=True)
class VhdxInfo:
    virtual_size: int | None
    has_parent: bool
    parent: dict[str, str]
    log_needs_replay: bool
    problems: tuple[fm.Problem, ...]


def vhdx_info(ctx: Context) -> VhdxInfo:
    return ctx.cached("vhdx", lambda: _parse_vhdx(ctx))


def _parse_vhdx(ctx: Context) -> VhdxInfo:
    layout = fm.parse_vhdx_layout(ctx.read(0, fm.VHDX_HEADER_AREA), ctx.size)
    problems = list(layout.problems)
    meta = layout.region(fm.VHDX_METADATA_GUID)
    if meta is None or meta.file_offset + fm.VHDX_METADATA_TABLE_SIZE > ctx.size:
        return VhdxInfo(None, False, {}, layout.log_needs_replay, tuple(problems))
    base = meta.file_offset
    items = fm.parse_vhdx_metadata_table(ctx.read(base, fm.VHDX_METADATA_TABLE_SIZE), meta.length)
    by_id = {i.item_id: i for i in items}

    def item(guid: bytes, need: int) -> bytes | None:
        it = by_id.get(guid)
        if it is None or it.length < need:
            return None
        return ctx.read(base + it.offset, min(it.length, fm.VHDX_MAX_LOCATOR))

    for name in fm.vhdx_unknown_required(items):
        problems.append(fm.Problem(f"VHDX has an unknown required metadata item {name}"))
    params = item(fm.VHDX_FILE_PARAMETERS, 8)
    has_parent = False
    if params is None or len(params) < 8:
        problems.append(fm.Problem("VHDX has no file parameters metadata item"))
    else:
        block_size, bits = struct.unpack_from("<II", params)
        has_parent = bool(bits & fm.VHDX_PARAMS_HAS_PARENT)
        if block_size < (1 << 20) or block_size > (256 << 20) or block_size & (block_size - 1):
            problems.append(fm.Problem(f"VHDX block size {block_size} is invalid"))
    vds = item(fm.VHDX_VIRTUAL_DISK_SIZE, 8)
    size = None
    if vds is None or len(vds) < 8:
        problems.append(fm.Problem("VHDX has no virtual disk size metadata item"))
    else:
        size = int.from_bytes(vds[:8], "little")
        if size > fm.VHDX_MAX_SIZE:
            problems.append(fm.Problem(f"VHDX virtual disk size {size} is above 64 TiB"))
    logical = item(fm.VHDX_LOGICAL_SECTOR_SIZE, 4)
    if logical is None or int.from_bytes(logical[:4], "little") not in (512, 4096):
        problems.append(fm.Problem("VHDX logical sector size is missing or not 512 or 4096"))
    parent: dict[str, str] = {}
    if has_parent:
        locator = item(fm.VHDX_PARENT_LOCATOR, 20)
        if locator is not None:
            try:
                parent = fm.parse_vhdx_parent_locator(locator)
            except QcowlibError:
                parent = {}
    return VhdxInfo(size, has_parent, parent, layout.log_needs_replay, tuple(problems))


def vdi_header(ctx: Context) -> fm.VdiHeader:
    return ctx.cached("vdi", lambda: fm.parse_vdi_header(ctx.read(0, fm.SECTOR)))


def iso_volume(ctx: Context) -> fm.IsoVolume:
    area = fm.ISO_MAX_DESCRIPTORS * fm.ISO_DESCRIPTOR_SIZE
    return ctx.cached(
        "iso", lambda: fm.parse_iso_descriptors(ctx.read(fm.ISO_DESCRIPTORS_AT, area), ctx.size)
    )


def luks_header(ctx: Context) -> fm.LuksHeader:
    return ctx.cached(
        "luks", lambda: fm.parse_luks_header(ctx.read(0, fm.LUKS_HEADER_SIZE), ctx.size)
    )


def declared_virtual_size(ctx: Context) -> int | None:
    """The guest-visible size the content declares (the file size for raw)."""
    fmt = ctx.format
    if fmt == "qcow2":
        return ctx.qcow2_fields().size
    if fmt == "vmdk":
        info = vmdk_info(ctx)
        if info.header is not None and info.header.capacity:
            return info.header.capacity * fm.SECTOR
        if info.descriptor is not None:
            return sum(e.sectors or 0 for e in info.descriptor.extents) * fm.SECTOR
        return None
    if fmt == "vpc":
        return vhd_info(ctx).footer.current_size
    if fmt == "vhdx":
        return vhdx_info(ctx).virtual_size
    if fmt == "vdi":
        return vdi_header(ctx).disk_size
    if fmt == "iso":
        return max(ctx.size, iso_volume(ctx).volume_size)
    if fmt == "luks":
        return max(0, ctx.size - luks_header(ctx).payload_offset * fm.SECTOR)
    return ctx.size


# ---------------------------------------------------------------------------------------
# structure


def _problems(
    ctx: Context, fmt: str, problems: tuple[fm.Problem, ...] | list[fm.Problem]
) -> Findings:
    for p in problems:
        text = f"{_NAMES.get(fmt, fmt)}: {p.message}"
        if p.fatal:
            yield ctx.error(text, p.offset, structural=True)
        else:
            yield ctx.warning(text, p.offset, structural=True)


def _structure_qcow2(ctx: Context) -> Findings:
    fields = ctx.qcow2_fields()
    if fields.version not in (2, 3):
        return  # banned-format / unknown-features say why
    try:
        ctx.qcow2_header()
    except UnsupportedFeature as exc:
        if exc.field != "incompatible_features":  # unknown bits: unknown-features
            raise
    yield from ()


def _structure_vmdk(ctx: Context) -> Findings:
    info = vmdk_info(ctx)
    if info.header is None:
        return
    yield from _problems(ctx, "vmdk", fm.vmdk_sparse_header_problems(info.header, ctx.size))
    if info.header.gd_offset == fm.VMDK_GD_AT_END:
        tail = ctx.read(max(0, ctx.size - 3 * fm.SECTOR), 3 * fm.SECTOR)
        yield from _problems(ctx, "vmdk", fm.vmdk_stream_footer_problems(info.header, tail))


def _structure_vpc(ctx: Context) -> Findings:
    yield from _problems(ctx, "vpc", vhd_info(ctx).problems)


def _structure_vhdx(ctx: Context) -> Findings:
    info = vhdx_info(ctx)
    yield from _problems(ctx, "vhdx", info.problems)
    if info.log_needs_replay:
        yield ctx.warning(
            "VHDX: its log has entries that were never replayed (it was not closed cleanly); "
            "QEMU needs to open it read-write once to replay them",
            structural=True,
        )


def _structure_vdi(ctx: Context) -> Findings:
    h = vdi_header(ctx)
    problems = fm.vdi_problems(h, ctx.size)
    # A differencing image is reported by backing-file, not as a structure problem.
    problems = [p for p in problems if not (h.image_type == 4 and p.offset == 0x4C)]
    yield from _problems(ctx, "vdi", problems)


def _structure_iso(ctx: Context) -> Findings:
    yield from _problems(ctx, "iso", iso_volume(ctx).problems)


def _structure_luks(ctx: Context) -> Findings:
    yield from _problems(ctx, "luks", luks_header(ctx).problems)


_STRUCTURE = {
    "qcow2": _structure_qcow2,
    "vmdk": _structure_vmdk,
    "vpc": _structure_vpc,
    "vhdx": _structure_vhdx,
    "vdi": _structure_vdi,
    "iso": _structure_iso,
    "luks": _structure_luks,
}


@rule("structure")
def structure(ctx: Context) -> Findings:
    """The image's own structures parse and agree with each other and the file size."""
    targets = [ctx.format]
    if ctx.forced_format is not None and ctx.forced_format != ctx.format:
        targets.append(ctx.forced_format)
    for fmt in targets:
        check = _STRUCTURE.get(fmt)
        if check is None:
            continue
        try:
            yield from check(ctx)
        except QcowlibError as exc:
            yield ctx.error(
                f"{_NAMES.get(fmt, fmt)} image does not parse: {_describe(exc)}; "
                "nothing can read it safely, so it is refused",
                exc.offset,
                structural=True,
            )


# ---------------------------------------------------------------------------------------
# format identity


def _glance_name(fmt: str) -> str:
    return fm.QEMU_TO_INSPECTOR.get(fmt, fmt)


@rule("format-match")
def format_match(ctx: Context) -> Findings:
    """The declared disk_format matches the content, as Glance's
    ``require_image_format_match`` demands (raw may hold anything, as in Glance)."""
    declared = ctx.disk_format
    if declared is None:
        return
    pol = ctx.policy
    want = declared
    if want not in pol.disk_formats:
        hint = ""
        if _glance_name(declared) in pol.disk_formats:
            hint = f"; Glance calls it {_glance_name(declared)!r}"
        yield ctx.error(
            f"disk_format {declared!r} is not one Glance accepts "
            f"(its disk_formats: {', '.join(pol.disk_formats)}){hint}"
        )
        return
    seen = ctx.inspector.format
    if seen is None:
        return  # format-ambiguous reports it
    ours = ctx.format
    if seen == want:
        if want == "raw" and ours == "vpc" and ctx.probe.detail == "footer-only":
            yield ctx.warning(
                "declared raw, and the content is a fixed VHD: a VM sees its disk followed "
                "by the 512-byte VHD footer (harmless; `qemu-img convert -f vpc -O raw` "
                "gives the plain disk)"
            )
        elif want == "raw" and ours not in ("raw", "iso"):
            name = _NAMES.get(ours, ours)
            yield ctx.warning(
                f"declared raw, but the content is a {name} image that Glance's inspector "
                f"does not recognise; a VM given it as raw sees the {name} container, not "
                f"its disk (convert it to raw first)"
            )
        return
    if seen == "raw" and want not in fm.INSPECTOR_FORMATS:
        return  # ami/ari/aki and friends: Glance cannot inspect them, raw content passes
    if want == "raw":
        if seen != "gpt":
            shown = _NAMES.get(fm.INSPECTOR_TO_QEMU.get(seen, seen), seen)
            yield ctx.warning(
                f"declared raw, but the content is a {shown} image; Glance accepts it and "
                f"stores it as raw, so a VM would see the {shown} container as its disk "
                f"(declare --disk-format {seen} instead)"
            )
        return
    shown = "raw (a disk with a partition table, which Glance calls gpt)" if seen == "gpt" else seen
    note = ""
    if ours == "vpc" and ctx.probe.detail == "footer-only":
        note = (
            "; Glance's inspector does not recognise fixed VHDs (they have only a footer) "
            "and sees raw: declare --disk-format raw"
        )
    elif ours != fm.INSPECTOR_TO_QEMU.get(shown, shown) and ours != "raw":
        note = f" (qcowlib detects {_NAMES.get(ours, ours)})"
    text = (
        f"declared disk_format {declared!r}, but the content is {shown}{note}; Glance refuses "
        f"a mismatch (require_image_format_match)"
    )
    if not note:
        suggest = "raw" if seen == "gpt" else shown
        text += f": declare --disk-format {suggest}, or convert the image to {declared}"
    if pol.require_image_format_match:
        yield ctx.error(text)
    else:
        yield ctx.warning(text)


@rule("format-ambiguous")
def format_ambiguous(ctx: Context) -> Findings:
    """The content is not several formats at once (Glance: "Multiple formats detected")."""
    view = ctx.inspector
    if view.format is None:
        yield ctx.error(
            f"the content matches several formats at once ({', '.join(view.matches)}); "
            "Glance refuses such files because different tools would read them differently"
        )


@rule("banned-format")
def banned_format(ctx: Context) -> Findings:
    """Formats Glance always refuses: QED, and legacy QCOW version 1."""
    if "qed" in ctx.inspector.matches:
        yield ctx.error(
            "this is a QED image, a format Glance refuses outright; convert it: "
            + _convert_cmd(ctx, "qemu-img")
        )
    if ctx.format == "qcow2" and ctx.probe.detail == "qcow1":
        yield ctx.error(
            "this is a legacy QCOW version 1 image, which Glance refuses and qcowlib does not "
            "read; convert it: " + _convert_cmd(ctx, "qemu-img"),
            4,
        )


# ---------------------------------------------------------------------------------------
# files outside the image


def _qcow2_backing(ctx: Context) -> Findings:
    try:
        f = ctx.qcow2_fields()
    except QcowlibError:
        return
    if not f.backing_file_offset or f.version < 2:
        return
    length = min(f.backing_file_size, MAX_BACKING_NAME)
    raw = ctx.read(f.backing_file_offset, length) if length else b""
    name = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    fmt = ""
    try:
        bfmt = ctx.qcow2_header().backing_format
        if bfmt:
            fmt = f" (format {fm.printable(bfmt)})"
    except QcowlibError:
        pass
    what = (
        f"backing file {_name(name)}{fmt}" if name else "a backing file whose name cannot be read"
    )
    yield ctx.error(
        f"this qcow2 has a {what}: it holds only the changes on top of that file, which "
        f"validate does not open and Glance will not have; Glance refuses images with "
        f"backing files. Run {_flatten_cmd(ctx)} first and upload the result",
        8,
    )


def _vmdk_parent(ctx: Context) -> Findings:
    try:
        info = vmdk_info(ctx)
    except QcowlibError:
        return
    d = info.descriptor
    hint = d.parent_file_name_hint if d is not None else None
    if hint:
        yield ctx.error(
            f"this VMDK is a delta disk of the parent {_name(hint)} (parentFileNameHint): "
            "QEMU would open that file, validate does not. Make a standalone disk first: "
            + _convert_cmd(ctx, "qemu-img")
        )


def _vhd_parent(ctx: Context) -> Findings:
    try:
        info = vhd_info(ctx)
    except QcowlibError:
        return
    if info.footer.disk_type != fm.VHD_TYPE_DIFFERENCING:
        return
    name = info.dynamic.parent_name if info.dynamic is not None else ""
    what = f"of the parent {_name(name)}" if name else "of a parent disk"
    yield ctx.error(
        f"this is a differencing VHD {what}: it holds only changes, and validate does not "
        "open the parent. Merge it into a standalone disk first (e.g. "
        + _convert_cmd(ctx, "qemu-img")
        + ")",
        info.footer_at + 60,
    )


def _vhdx_parent(ctx: Context) -> Findings:
    try:
        info = vhdx_info(ctx)
    except QcowlibError:
        return
    if not info.has_parent:
        return
    names = [
        info.parent[k]
        for k in ("relative_path", "absolute_win32_path", "volume_path")
        if info.parent.get(k)
    ]
    what = f"of the parent {_name(names[0])}" if names else "of a parent disk"
    yield ctx.error(
        f"this is a differencing VHDX {what}: it holds only changes, and validate does not "
        "open the parent. Merge it into a standalone disk first (e.g. "
        + _convert_cmd(ctx, "qemu-img")
        + ")"
    )


def _vdi_parent(ctx: Context) -> Findings:
    try:
        h = vdi_header(ctx)
    except QcowlibError:
        return
    if h.image_type == 4 or any(h.uuid_parent):
        yield ctx.error(
            "this is a differencing VDI (its parent is named by UUID "
            f"{h.uuid_parent.hex()}): it holds only changes. Clone it into a standalone disk "
            "first (VBoxManage clonemedium)",
            0x1B8,
        )


@rule("backing-file", formats=["qcow2", "vmdk", "vpc", "vhdx", "vdi"])
def backing_file(ctx: Context) -> Findings:
    """No backing (parent) file: qcow2 backing files, VMDK parentFileNameHint,
    differencing VHD/VHDX/VDI.  Glance refuses qcow2 backing files; qcowlib also
    refuses the other formats' parents, which Glance's inspector does not look for."""
    checks = {
        "qcow2": _qcow2_backing,
        "vmdk": _vmdk_parent,
        "vpc": _vhd_parent,
        "vhdx": _vhdx_parent,
        "vdi": _vdi_parent,
    }
    for fmt, check in checks.items():
        if fmt in ctx.formats:
            yield from check(ctx)


@rule("data-file", formats=["qcow2"])
def data_file(ctx: Context) -> Findings:
    """No external data file (incompatible feature bit 2, or the data file extension)."""
    try:
        f = ctx.qcow2_fields()
    except QcowlibError:
        return
    bit = bool(f.incompatible_features & INCOMPAT_DATA_FILE)
    name = f.data_file_extension
    if not bit and name is None:
        return
    what = f" {_name(name)}" if name else ""
    if bit:
        yield ctx.error(
            f"this qcow2 keeps its guest data in an external data file{what} (data_file, "
            "incompatible feature bit 2): the image itself holds only metadata, validate "
            "does not open the data file, and Glance refuses such images. Make a "
            f"self-contained image first: {_convert_cmd(ctx)}",
            72,
        )
    else:
        yield ctx.error(
            f"this qcow2 has an external data file extension naming{what} although its "
            "data-file feature bit is clear; a tool honouring the extension would read "
            f"another file. Rewrite it: {_convert_cmd(ctx)}"
        )


@rule("unknown-features", formats=["qcow2"])
def unknown_features(ctx: Context) -> Findings:
    """qcow2 versions and incompatible feature bits beyond what Glance accepts (bits 0-3):
    extended L2 entries (bit 4) and any bit QEMU does not know."""
    try:
        f = ctx.qcow2_fields()
    except QcowlibError:
        return
    if f.version not in (1, 2, 3):
        yield ctx.error(
            f"qcow2 version {f.version} does not exist (only 2 and 3 do); Glance refuses it "
            "and nothing can read it",
            4,
            structural=True,
        )
        return
    if f.version != 3:
        return
    beyond = f.incompatible_features & ~ctx.policy.qcow2_incompatible_mask
    if beyond & INCOMPAT_EXTL2:
        yield ctx.error(
            "this qcow2 uses extended L2 entries (subclusters, incompatible feature bit 4), "
            "which Glance's inspector refuses (it accepts incompatible features 0-3 only). "
            f"Rewrite it without them: {_convert_cmd(ctx)}",
            72,
        )
    unknown = beyond & ~INCOMPAT_EXTL2
    if unknown:
        yield ctx.error(
            f"this qcow2 sets incompatible feature bits {unknown:#x} that neither QEMU nor "
            "Glance know; nothing can read it safely",
            72,
            structural=bool(unknown & ~KNOWN_INCOMPAT),
        )


@rule("encrypted", formats=["luks", "qcow2"])
def encrypted(ctx: Context) -> Findings:
    """No encryption: LUKS volumes and encrypted qcow2.  Stricter than Glance, which
    accepts LUKS1 declared raw: an encrypted image cannot be checked inside."""
    if "luks" in ctx.formats and ctx.head[:6] == fm.LUKS_MAGIC:
        try:
            h = luks_header(ctx)
        except QcowlibError:
            version = int.from_bytes(ctx.head[6:8], "big")
            h = fm.LuksHeader(version, "", 0, 0, 0, ())
        if h.version != 1:
            yield ctx.error(
                f"this is a LUKS version {h.version} volume, which Glance's inspector and "
                "QEMU do not support; decrypt it and upload the plain disk",
                6,
            )
        else:
            cipher = f" ({fm.printable(h.cipher)})" if h.cipher.strip("-") else ""
            yield ctx.error(
                f"this is a LUKS-encrypted volume{cipher}: nothing inside it can be checked "
                "without its key. Decrypt it (qemu-img convert with --object secret and "
                "--image-opts driver=luks) and validate the plain image"
            )
    if "qcow2" in ctx.formats:
        try:
            f = ctx.qcow2_fields()
        except QcowlibError:
            return
        if f.crypt_method == 1:
            yield ctx.error(
                "this qcow2 uses the legacy AES-CBC encryption (crypt_method 1), which is "
                "insecure and which QEMU no longer supports for new images; decrypt it first",
                32,
            )
        elif f.crypt_method:
            yield ctx.error(
                f"this qcow2 is encrypted (crypt_method {f.crypt_method}); nothing inside it "
                "can be checked without its key. Decrypt it first",
                32,
            )


# ---------------------------------------------------------------------------------------
# VMDK


@rule("vmdk-create-type", formats=["vmdk"])
def vmdk_create_type(ctx: Context) -> Findings:
    """The VMDK createType is allowed (Glance's vmdk_allowed_types: streamOptimized and
    monolithicSparse, the single-file variants)."""
    allowed = ctx.policy.vmdk_allowed_types
    listed = ", ".join(allowed) if allowed else "none"
    try:
        info = vmdk_info(ctx)
    except QcowlibError:
        return
    if info.kind == "cowd":
        yield ctx.error(
            "this is a VMware 3 / ESX sparse extent (COWD, vmfsSparse), not an allowed "
            f"VMDK type (allowed: {listed}); convert it: " + _convert_cmd(ctx, "qemu-img")
        )
        return
    if info.descriptor is None or not (info.descriptor.fields or info.descriptor.extents):
        return  # vmdk-descriptor reports a missing, empty or unreadable descriptor
    ct = info.descriptor.create_type
    if ct is None:
        yield ctx.error(f"this VMDK's descriptor has no createType (allowed: {listed})")
        return
    if ct.lower() in {a.lower() for a in allowed}:
        return
    hint = ""
    if info.kind == "descriptor" or ct.lower() in (
        "monolithicflat",
        "twogbmaxextentsparse",
        "twogbmaxextentflat",
        "vmfs",
        "vmfssparse",
        "vmfsraw",
        "vmfsrdm",
        "fullDevice".lower(),
        "partitionedDevice".lower(),
    ):
        hint = "; this type keeps its data in other files"
    yield ctx.error(
        f"VMDK createType {_name(ct)} is not allowed (allowed: {listed}, Glance's "
        f"vmdk_allowed_types){hint}. Convert it into a single file: `qemu-img convert -O vmdk "
        f"-o subformat=streamOptimized {_q(ctx.path)} {_q(_out_name(ctx.path, '-stream.vmdk'))}`"
    )


@rule("vmdk-descriptor", formats=["vmdk"])
def vmdk_descriptor(ctx: Context) -> Findings:
    """The VMDK descriptor is where QEMU and Glance expect it and holds nothing Glance's
    inspector does not understand (it refuses unknown lines and descriptors without
    extents)."""
    try:
        info = vmdk_info(ctx)
    except QcowlibError:
        return
    if info.kind == "cowd":
        return
    h = info.header
    if h is not None:
        if not h.desc_offset or not h.desc_size:
            yield ctx.error(
                "this sparse VMDK has no embedded descriptor; Glance's inspector refuses it", 28
            )
            return
        if h.desc_offset != fm.VMDK_DESC_SECTOR:
            yield ctx.error(
                f"this VMDK's descriptor is at sector {h.desc_offset}, not sector 1 where QEMU "
                "writes it and Glance's inspector looks for it",
                28,
            )
    if info.descriptor_error is not None:
        yield ctx.error(
            f"the VMDK descriptor cannot be read: {info.descriptor_error.message}",
            info.descriptor_error.offset,
        )
        return
    d = info.descriptor
    if d is None:
        return
    if h is not None and not d.fields and not d.extents:
        yield ctx.error(
            "this sparse VMDK's embedded descriptor is empty: it is one extent of a "
            "multi-file VMDK, not a disk on its own; Glance refuses it",
            h.desc_offset * fm.SECTOR,
        )
        return
    for number, line in d.unsupported_lines[:3]:
        yield ctx.error(
            f"VMDK descriptor line {number} is neither a field, an extent nor a ddb entry "
            f"({_name(line)}); Glance refuses descriptors it cannot fully understand"
        )
    if len(d.unsupported_lines) > 3:
        yield ctx.error(f"... and {len(d.unsupported_lines) - 3} more such descriptor lines")
    if not d.extents:
        yield ctx.error("the VMDK descriptor names no extents; Glance refuses it")


@rule("vmdk-extent", formats=["vmdk"])
def vmdk_extent(ctx: Context) -> Findings:
    """The VMDK names no extent files but itself.  A stand-alone descriptor (or a sparse
    header of capacity 0 with an embedded descriptor, which QEMU then follows) makes
    whoever opens it read the named files: validate reports them and opens none."""
    try:
        info = vmdk_info(ctx)
    except QcowlibError:
        return
    d = info.descriptor
    if d is None:
        return
    for number, line in d.slash_extent_lines[:5]:
        yield ctx.error(
            f"VMDK extent line {number} names a path containing '/' ({_name(line)}): a "
            "descriptor can make a host read any of its files this way; Glance refuses it"
        )
    followed = info.kind == "descriptor" or (info.header is not None and info.header.capacity == 0)
    if not followed:
        return
    named = [e for e in d.extents if e.filename is not None]
    if not named:
        return
    shown = ", ".join(f"{_name(e.filename or '')} ({e.type or '?'})" for e in named[:5])
    more = f" and {len(named) - 5} more" if len(named) > 5 else ""
    kind = (
        "this VMDK descriptor"
        if info.kind == "descriptor"
        else "this sparse VMDK (capacity 0, so QEMU follows its embedded descriptor)"
    )
    yield ctx.error(
        f"{kind} names {len(named)} extent file(s) outside the image: {shown}{more}; "
        "validate never opens them, and Glance accepts only single-file VMDKs. Convert the "
        "disk into one file where its extents are, e.g. " + _convert_cmd(ctx, "qemu-img")
    )


# ---------------------------------------------------------------------------------------
# raw: MBR and GPT


@rule("mbr")
def mbr(ctx: Context) -> Findings:
    """A raw disk whose first sector ends in 0x55AA has a sane MBR partition table (the
    image inspector's ``mbr`` check: boot flags, protective-MBR layout, some partition)."""
    if ctx.inspector.format != "gpt":
        return
    try:
        parts = fm.parse_mbr(ctx.head[: fm.SECTOR])
    except QcowlibError:
        return
    nonfatal = "mbr" in ctx.policy.gpt_safety_checks_nonfatal or ctx.disk_format in ("aki", "ari")
    for p in fm.mbr_problems(parts):
        text = (
            f"{p.message}; Glance's inspector refuses disks whose sector 0 ends in the "
            "MBR signature 0x55AA but whose partition table is malformed"
        )
        if p.message == "MBR defines no partitions":
            text = (
                "sector 0 ends in the MBR signature 0x55AA but defines no partitions; "
                "Glance's inspector refuses such disks (clear bytes 510-511 if the disk has "
                "no partition table)"
            )
        yield ctx.warning(text, p.offset) if nonfatal else ctx.error(text, p.offset)


@rule("gpt")
def gpt(ctx: Context) -> Findings:
    """A disk with a protective MBR has a valid GPT header and partition array (CRCs,
    LBAs).  Glance does not check this; the ``glance`` policy warns."""
    if ctx.format not in ("raw", "iso") or "gpt" not in ctx.inspector.matches:
        return
    try:
        parts = fm.parse_mbr(ctx.head[: fm.SECTOR])
    except QcowlibError:
        return
    if not any(p.os_type == fm.MBR_TYPE_GPT_PROTECTIVE for p in parts):
        return
    header = None
    block = fm.SECTOR
    for block in (fm.SECTOR, 4096):
        data = ctx.read(block, fm.SECTOR)
        if data[:8] == fm.GPT_SIGNATURE:
            header = fm.parse_gpt_header(data, block, ctx.size)
            break
    if header is None:
        yield ctx.warning(
            "the MBR is a GPT protective MBR but no GPT header ('EFI PART') is at LBA 1; "
            "the disk's partitions cannot be found",
            fm.SECTOR,
        )
        return
    for p in header.problems:
        yield ctx.warning(f"GPT: {p.message}", p.offset)
    length = header.entry_array_length
    at = header.partition_entry_lba * block
    if header.problems or not 0 < length <= fm.GPT_MAX_ENTRY_ARRAY:
        return
    array = ctx.read(at, length)
    if len(array) < length:
        yield ctx.warning("GPT partition entry array lies past the end of the file", at)
    elif zlib.crc32(array) != header.partition_entry_array_crc32:
        yield ctx.warning("GPT partition entry array CRC32 is wrong", at)


# ---------------------------------------------------------------------------------------
# state and size


def _incompat(ctx: Context) -> int:
    try:
        f = ctx.qcow2_fields()
    except QcowlibError:
        return 0
    return f.incompatible_features if f.version == 3 else 0


@rule("corrupt", formats=["qcow2"])
def corrupt(ctx: Context) -> Findings:
    """The qcow2 corrupt bit is clear (QEMU sets it when it finds inconsistent metadata)."""
    if _incompat(ctx) & INCOMPAT_CORRUPT:
        yield ctx.error(
            "this qcow2 is marked corrupt: QEMU found inconsistent metadata in it and stopped "
            f"writing to it. Run `qcowlib check -r all {_q(ctx.path)}` (and check the data), "
            "or re-create the image",
            72,
            structural=True,
        )


@rule("dirty", formats=["qcow2"])
def dirty(ctx: Context) -> Findings:
    """The qcow2 dirty bit is clear (set while open with lazy refcounts)."""
    if _incompat(ctx) & INCOMPAT_DIRTY:
        yield ctx.warning(
            "this qcow2 was not closed cleanly (dirty bit: its refcounts may be stale); run "
            f"`qcowlib check -r all {_q(ctx.path)}` before uploading it",
            72,
        )


@rule("virtual-size")
def virtual_size(ctx: Context) -> Findings:
    """The virtual size is within the policy's limit (default: Glance's image_size_cap,
    1 TiB), so a small file cannot declare an enormous disk."""
    size = ctx.virtual_size()
    if size is None:
        return
    limit = ctx.policy.virtual_size_limit
    if size > limit:
        yield ctx.error(
            f"virtual size {_human(size)} is above this policy's limit of {_human(limit)} "
            "(Glance's image_size_cap); shrink the disk or use a policy with a larger "
            "max_virtual_size"
        )


@rule("image-size")
def image_size(ctx: Context) -> Findings:
    """The file is no larger than Glance's image_size_cap (Glance answers 413 above it)."""
    cap = ctx.policy.image_size_cap
    if ctx.size > cap:
        yield ctx.error(
            f"the file is {_human(ctx.size)}, above Glance's image_size_cap of {_human(cap)} "
            "(Glance answers 413); compress it (`qcowlib convert -c -O qcow2 SRC DST`) or "
            "raise the cap"
        )


@rule("check", formats=["qcow2"])
def check(ctx: Context) -> Findings:
    """qcowlib's qcow2 consistency check (as ``qemu-img check``) finds no corruption;
    leaks are warnings.  Skipped where the check would open other files (backing or
    data file), or when qcowlib.ops.check is not installed."""
    if not ctx.policy.run_check or ctx.format != "qcow2":
        return
    try:
        mod = importlib.import_module("qcowlib.ops.check")
    except ImportError:
        return
    try:
        f = ctx.qcow2_fields()
        ctx.qcow2_header()
    except QcowlibError:
        return  # structure and friends report it
    if (
        f.backing_file_offset
        or f.incompatible_features & (INCOMPAT_DATA_FILE | ~KNOWN_INCOMPAT)
        or f.data_file_extension is not None
        or f.crypt_method
    ):
        return
    try:
        report = mod.check(ctx.same_file_path(), "qcow2")
    except FormatError as exc:
        yield ctx.error(
            f"qcowlib check cannot read this qcow2: {_describe(exc)}", exc.offset, structural=True
        )
        return
    except QcowlibError as exc:
        yield ctx.warning(f"qcowlib check did not run: {_describe(exc)}")
        return
    except Exception as exc:  # the check is extra safety, not a safety rule itself
        yield ctx.warning(f"qcowlib check failed internally ({type(exc).__name__}: {exc})")
        return
    failure = getattr(report, "failure", None)
    corruptions = int(getattr(report, "corruptions", 0) or 0)
    leaks = int(getattr(report, "leaks", 0) or 0)
    check_errors = int(getattr(report, "check_errors", 0) or 0)
    cmd = f"`qcowlib check -r all {_q(ctx.path)}`"
    if failure:
        yield ctx.error(f"qcowlib check could not complete: {failure}", structural=True)
    if corruptions:
        yield ctx.error(
            f"qcowlib check found {corruptions} corruption(s) in this qcow2's metadata: data "
            f"may be wrong and writes may damage it. Repair with {cmd} and re-check, or "
            "re-create the image",
            structural=True,
        )
    if check_errors:
        yield ctx.error(
            f"qcowlib check hit {check_errors} error(s) while checking this qcow2",
            structural=True,
        )
    if leaks:
        yield ctx.warning(
            f"qcowlib check found {leaks} leaked cluster(s): wasted space, no harm to data "
            f"(`qcowlib check -r leaks {_q(ctx.path)}` reclaims it)"
        )


BUILTIN_RULES: Final[tuple[Rule, ...]] = (
    structure,
    format_match,
    format_ambiguous,
    banned_format,
    backing_file,
    data_file,
    unknown_features,
    encrypted,
    vmdk_create_type,
    vmdk_descriptor,
    vmdk_extent,
    mbr,
    gpt,
    corrupt,
    dirty,
    virtual_size,
    image_size,
    check,
)
