"""VMDK rules: the createType Glance allows, the descriptor, and the extents it names.

Extent files are reported by name, never opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qcowlib.errors import QcowlibError
from qcowlib.validate.engine import Context
from qcowlib.validate.model import rule
from qcowlib.validate.rules._common import Findings, convert_cmd, out_name, quote, shown_name
from qcowlib.validate.structures import vmdk_info

if TYPE_CHECKING:
    pass

__all__ = ["vmdk_create_type", "vmdk_descriptor", "vmdk_extent"]


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
            f"VMDK type (allowed: {listed}); convert it: " + convert_cmd(ctx, "qemu-img")
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
    out = quote(out_name(ctx.path, "-stream.vmdk"))
    yield ctx.error(
        f"VMDK createType {shown_name(ct)} is not allowed (allowed: {listed}, Glance's "
        f"vmdk_allowed_types){hint}. Convert it into a single file: `qemu-img convert -O vmdk "
        f"-o subformat=streamOptimized {quote(ctx.path)} {out}`"
    )


@rule("vmdk-descriptor", formats=["vmdk"])
def vmdk_descriptor(ctx: Context) -> Findings:
    """The VMDK descriptor is where QEMU and Glance expect it and holds nothing Glance's
    inspector does not understand (it refuses unknown lines and descriptors without
    extents)."""
    from qcowlib.formats.vmdk import codec as vmdk

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
        if h.desc_offset != vmdk.VMDK_DESC_SECTOR:
            yield ctx.error(
                f"this VMDK's descriptor is at sector {h.desc_offset}, not sector 1 where QEMU "
                "writes it and Glance's inspector looks for it",
                28,
            )
    if info.descriptor_error is not None:
        # qcowlib's reader refuses it too: structural, refused by every policy.
        yield ctx.error(
            f"the VMDK descriptor cannot be read: {info.descriptor_error.message}",
            info.descriptor_error.offset,
            structural=True,
        )
        return
    d = info.descriptor
    if d is None:
        return
    if d.non_ascii_at is not None:
        start = h.desc_offset * vmdk.SECTOR if h is not None else 0
        yield ctx.error(
            "the VMDK descriptor is not ASCII text (QEMU reads it, VMware writes file "
            "names and ddb values in other encodings); Glance's image inspector refuses it",
            start + d.non_ascii_at,
        )
    if h is not None and not d.fields and not d.extents:
        yield ctx.error(
            "this sparse VMDK's embedded descriptor is empty: it is one extent of a "
            "multi-file VMDK, not a disk on its own; Glance refuses it",
            h.desc_offset * vmdk.SECTOR,
        )
        return
    for number, line in d.unsupported_lines[:3]:
        yield ctx.error(
            f"VMDK descriptor line {number} is neither a field, an extent nor a ddb entry "
            f"({shown_name(line)}); Glance refuses descriptors it cannot fully understand"
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
            f"VMDK extent line {number} names a path containing '/' ({shown_name(line)}): a "
            "descriptor can make a host read any of its files this way; Glance refuses it"
        )
    if not info.followed:
        return
    named = [e for e in d.extents if e.filename is not None]
    if not named:
        return
    shown = ", ".join(f"{shown_name(e.filename or '')} ({e.type or '?'})" for e in named[:5])
    more = f" and {len(named) - 5} more" if len(named) > 5 else ""
    kind = (
        "this VMDK descriptor"
        if info.kind == "descriptor"
        else "this sparse VMDK (capacity 0, so QEMU follows its embedded descriptor)"
    )
    yield ctx.error(
        f"{kind} names {len(named)} extent file(s) outside the image: {shown}{more}; "
        "validate never opens them, and Glance accepts only single-file VMDKs. Convert the "
        "disk into one file where its extents are, e.g. " + convert_cmd(ctx, "qemu-img")
    )
