"""The ``structure`` rule: the image parses, with the checks its reader applies.

Headers and tables are read through the format codecs (:mod:`qcowlib.formats`) and
judged by the same check functions the readers call when they open an image, so that
``validate`` is never laxer than opening: what ``convert`` would refuse is refused here,
with the reader's reason.  Tables (VHD and VHDX BATs, the VDI block map, VMDK grain
directories and tables) are read whole, as the readers read them, up to
:data:`~qcowlib.validate.engine.MAX_TABLE_READ`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import pairwise
from typing import TYPE_CHECKING, Final

from qcowlib.errors import QcowlibError, UnsupportedFeature
from qcowlib.validate.engine import MAX_TABLE_READ, Context
from qcowlib.validate.formats import Problem
from qcowlib.validate.model import rule
from qcowlib.validate.rules._common import (
    Findings,
    describe,
    format_name,
    human,
    report_problems,
)
from qcowlib.validate.structures import (
    iso_volume,
    luks_header,
    vdi_header,
    vhd_info,
    vhdx_info,
    vmdk_info,
)

if TYPE_CHECKING:
    from qcowlib.formats.vmdk import codec as vmdk

__all__ = ["structure"]


def _fatal(problems: Iterable[Problem]) -> bool:
    return any(p.fatal for p in problems)


def _too_large(ctx: Context, fmt: str, what: str, length: int) -> Findings:
    """A table validate will not read: refused rather than accepted unchecked."""
    yield ctx.error(
        f"{format_name(fmt)}: the {what} is {human(length)}, more than validate reads "
        f"({human(MAX_TABLE_READ)}); it cannot be checked, so the image is refused",
        structural=True,
    )


# ---------------------------------------------------------------------------------------
# qcow2


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


# ---------------------------------------------------------------------------------------
# VMDK


def _structure_vmdk(ctx: Context) -> Findings:
    from qcowlib.formats.vmdk import codec as vmdk

    info = vmdk_info(ctx)
    if info.kind == "cowd":
        # An ESX sparse extent on its own (a snapshot delta): its header, checked by the
        # VMDK package's COWD codec; its parent is the backing-file rule's business.
        from qcowlib.formats.vmdk.cowd import parse_cowd_header

        try:
            parse_cowd_header(ctx.read(0, vmdk.SECTOR), ctx.size)
        except QcowlibError as exc:
            yield from report_problems(ctx, "vmdk", [Problem.of(exc)])
        return
    problems: list[Problem] = []
    h = info.header
    effective = h
    if h is not None:
        problems += map(Problem.of, vmdk.header_problems(h, ctx.size))
        if h.gd_offset == vmdk.GD_AT_END:
            tail = ctx.read(max(0, ctx.size - 3 * vmdk.SECTOR), 3 * vmdk.SECTOR)
            try:
                effective = vmdk.stream_footer_header(tail, ctx.size)
            except QcowlibError as exc:
                problems.append(Problem.of(exc))
                effective = None
            problems += _glance_footer_problems(h, tail)
    if info.followed and info.descriptor is not None:
        # Opening reads this descriptor as the disk; its extent files are the
        # vmdk-extent rule's to report (validate never opens them).
        problems += map(Problem.of, vmdk.descriptor_problems(info.descriptor))
    yield from report_problems(ctx, "vmdk", problems)
    if effective is not None and effective.capacity and not info.followed and not _fatal(problems):
        yield from _vmdk_tables(ctx, effective)


def _glance_footer_problems(h: vmdk.SparseExtentHeader, tail: bytes) -> list[Problem]:
    """What the image inspector's ``check_footer`` refuses beyond what QEMU does."""
    from qcowlib.formats.vmdk import codec as vmdk

    try:
        marker, footer, eos = vmdk.parse_stream_footer(tail)
    except QcowlibError:
        return []  # stream_footer_header reported it
    pad = bytes(496)
    problems = []
    if marker.pad != pad:
        problems.append(Problem("VMDK footer marker has non-zero padding"))
    if footer.version != h.version:
        problems.append(Problem("VMDK footer and header versions differ"))
    if (footer.desc_offset, footer.desc_size) != (h.desc_offset, h.desc_size):
        problems.append(Problem("VMDK footer names a different descriptor than the header"))
    if eos.pad != pad:
        problems.append(Problem("VMDK end-of-stream marker has non-zero padding"))
    return problems


def _vmdk_tables(ctx: Context, h: vmdk.SparseExtentHeader) -> Findings:
    """The grain directory and tables, checked as the reader checks them on open."""
    from qcowlib.formats.vmdk import codec as vmdk

    gd_at, gd_len = vmdk.grain_directory_extent(h)
    if gd_len > MAX_TABLE_READ:
        yield from _too_large(ctx, "vmdk", "grain directory", gd_len)
        return
    raw = ctx.read_table(gd_at, gd_len)
    gd = vmdk.decode_table(raw, h.num_gd_entries, what="grain directory", offset=gd_at)
    offsets = vmdk.grain_table_offsets(gd, h, ctx.size, gd_at).tolist()
    gt_bytes = h.gt_bytes
    if len(offsets) * gt_bytes > MAX_TABLE_READ:
        yield from _too_large(ctx, "vmdk", "set of grain tables", len(offsets) * gt_bytes)
        return
    if all(b - a == gt_bytes for a, b in pairwise(offsets)):
        raw = ctx.read_table(offsets[0], len(offsets) * gt_bytes) if offsets else b""
    else:
        raw = b"".join(ctx.read(at, gt_bytes) for at in offsets)
    at = offsets[0] if offsets else 0
    tables = vmdk.decode_table(raw, len(offsets) * h.num_gtes_per_gt, offset=at)
    vmdk.check_grain_tables(gd, tables, h, ctx.size)


# ---------------------------------------------------------------------------------------
# VHD, VHDX, VDI


def _structure_vpc(ctx: Context) -> Findings:
    from qcowlib.formats.vhd import codec as vhd

    info = vhd_info(ctx)
    yield from report_problems(ctx, "vpc", info.problems)
    dyn = info.dynamic
    if dyn is None or _fatal(info.problems):
        return
    length = dyn.max_table_entries * 4
    if length > MAX_TABLE_READ:
        yield from _too_large(ctx, "vpc", "block allocation table", length)
        return
    bat = vhd.decode_bat(ctx.read_table(dyn.table_offset, length), dyn.max_table_entries)
    vhd.check_bat(bat, dyn.block_size, ctx.size, dyn.table_offset)


def _structure_vhdx(ctx: Context) -> Findings:
    from qcowlib.formats.vhdx import codec as vhdx

    info = vhdx_info(ctx)
    yield from report_problems(ctx, "vhdx", info.problems)
    if info.bat is None or info.metadata is None or _fatal(info.problems):
        return
    entries, at = info.bat
    if entries * 8 > MAX_TABLE_READ:
        yield from _too_large(ctx, "vhdx", "BAT", entries * 8)
        return
    bat = vhdx.decode_bat(ctx.read_table(at, entries * 8), entries, at)
    vhdx.check_bat(bat, info.metadata, ctx.size, at)


def _structure_vdi(ctx: Context) -> Findings:
    from qcowlib.formats.vdi import codec as vdi

    h = vdi_header(ctx)
    problems = [
        Problem.of(p)
        for p in vdi.header_problems(h, ctx.size)
        # A differencing image is reported by backing-file, not as a structure problem.
        if p.field != "uuid_parent"
        and not (p.field == "image_type" and h.image_type == vdi.VDI_TYPE_DIFF)
    ]
    yield from report_problems(ctx, "vdi", problems)
    if _fatal(problems):
        return
    at, length = vdi.block_map_extent(h)
    if length > MAX_TABLE_READ:
        yield from _too_large(ctx, "vdi", "block map", length)
        return
    vdi.decode_block_map(ctx.read_table(at, length), h, ctx.size)


# ---------------------------------------------------------------------------------------
# ISO, LUKS, and the rule


def _structure_bochs(ctx: Context) -> Findings:
    from qcowlib.formats.bochs import codec as bochs

    h = bochs.parse_header(ctx.read(0, bochs.HEADER_SIZE), ctx.size)
    bochs.decode_catalog(ctx.read_table(h.header, h.extents_used * 4), h, ctx.size)
    yield from ()


def _structure_cloop(ctx: Context) -> Findings:
    from qcowlib.formats.cloop import codec as cloop

    h = cloop.parse_header(ctx.read(0, cloop.OFFSETS_AT), ctx.size)
    if h.offsets_size > MAX_TABLE_READ:
        yield from _too_large(ctx, "cloop", "offsets table", h.offsets_size)
        return
    cloop.decode_offsets(ctx.read_table(cloop.OFFSETS_AT, h.offsets_size), h, ctx.size)


def _structure_dmg(ctx: Context) -> Findings:
    from qcowlib.formats.dmg import reader as dmg_reader

    dmg_reader.read_table(ctx.read_table, ctx.size)
    yield from ()


def _structure_iso(ctx: Context) -> Findings:
    yield from report_problems(ctx, "iso", iso_volume(ctx).problems)


def _structure_luks(ctx: Context) -> Findings:
    yield from report_problems(ctx, "luks", luks_header(ctx).problems)


_STRUCTURE: Final[dict[str, Callable[[Context], Findings]]] = {
    "qcow2": _structure_qcow2,
    "vmdk": _structure_vmdk,
    "vpc": _structure_vpc,
    "vhdx": _structure_vhdx,
    "vdi": _structure_vdi,
    "bochs": _structure_bochs,
    "cloop": _structure_cloop,
    "dmg": _structure_dmg,
    "iso": _structure_iso,
    "luks": _structure_luks,
}


def _read_only_structure(fmt: str) -> Callable[[Context], Findings] | None:
    """The check of a format qcowlib reads but does not write (its reader maps it)."""
    from qcowlib.formats import registry
    from qcowlib.validate.rules.readonly import structure_of

    if fmt not in registry.known():
        return None
    entry = registry.by_name(fmt)
    return structure_of(fmt) if entry.reader is not None and entry.output is None else None


@rule("structure")
def structure(ctx: Context) -> Findings:
    """The image's own structures parse and agree with each other and the file size,
    with the checks qcowlib's reader applies when it opens the image."""
    targets = [ctx.format]
    if ctx.forced_format is not None and ctx.forced_format != ctx.format:
        targets.append(ctx.forced_format)
    for fmt in targets:
        check = _STRUCTURE.get(fmt) or _read_only_structure(fmt)
        if check is None:
            continue
        try:
            yield from check(ctx)
        except QcowlibError as exc:
            yield ctx.error(
                f"{format_name(fmt)} image does not parse: {describe(exc)}; "
                "nothing can read it safely, so it is refused",
                exc.offset,
                structural=True,
            )
