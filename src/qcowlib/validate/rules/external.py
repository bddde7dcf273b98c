"""Files outside the image: backing (parent) files and external data files.

They are reported by name, read from the image, and never opened.
"""

from __future__ import annotations

from qcowlib.errors import QcowlibError
from qcowlib.formats.qcow2 import header as qcow2_header
from qcowlib.validate import formats as fm
from qcowlib.validate.engine import Context
from qcowlib.validate.model import rule
from qcowlib.validate.rules._common import Findings, convert_cmd, flatten_cmd, shown_name
from qcowlib.validate.rules.readonly import backing_of
from qcowlib.validate.structures import (
    vdi_header,
    vdi_is_differencing,
    vhd_info,
    vhdx_info,
    vmdk_info,
)

__all__ = ["backing_file", "data_file"]


def _qcow2_backing(ctx: Context) -> Findings:
    try:
        f = ctx.qcow2_fields()
    except QcowlibError:
        return
    if not f.backing_file_offset or f.version < 2:
        return
    length = min(f.backing_file_size, qcow2_header.MAX_BACKING_FILE_NAME)
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
        f"backing file {shown_name(name)}{fmt}"
        if name
        else "a backing file whose name cannot be read"
    )
    yield ctx.error(
        f"this qcow2 has a {what}: it holds only the changes on top of that file, which "
        f"validate does not open and Glance will not have; Glance refuses images with "
        f"backing files. Run {flatten_cmd(ctx)} first and upload the result",
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
            f"this VMDK is a delta disk of the parent {shown_name(hint)} (parentFileNameHint): "
            "QEMU would open that file, validate does not. Make a standalone disk first: "
            + convert_cmd(ctx, "qemu-img")
        )


def _vhd_parent(ctx: Context) -> Findings:
    try:
        info = vhd_info(ctx)
    except QcowlibError:
        return
    if not info.differencing:
        return
    name = info.parent_name
    what = f"of the parent {shown_name(name)}" if name else "of a parent disk"
    yield ctx.error(
        f"this is a differencing VHD {what}: it holds only changes, and validate does not "
        "open the parent (nor can qcowlib read it). Merge it into a standalone disk first "
        "(e.g. " + convert_cmd(ctx, "qemu-img") + ")",
        info.footer_at + 60,
        structural=True,
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
    what = f"of the parent {shown_name(names[0])}" if names else "of a parent disk"
    yield ctx.error(
        f"this is a differencing VHDX {what}: it holds only changes, and validate does not "
        "open the parent (nor can qcowlib read it). Merge it into a standalone disk first "
        "(e.g. " + convert_cmd(ctx, "qemu-img") + ")",
        structural=True,
    )


def _vdi_parent(ctx: Context) -> Findings:
    try:
        h = vdi_header(ctx)
    except QcowlibError:
        return
    if vdi_is_differencing(h):
        yield ctx.error(
            "this is a differencing VDI (its parent is named by UUID "
            f"{h.uuid_parent.bytes_le.hex()}): it holds only changes, and qcowlib cannot "
            "read it. Clone it into a standalone disk first (VBoxManage clonemedium)",
            0x1B8,
            structural=True,
        )


@rule("backing-file", formats=["qcow2", "vmdk", "vpc", "vhdx", "vdi", "qcow", "qed"])
def backing_file(ctx: Context) -> Findings:
    """No backing (parent) file: qcow2 backing files, VMDK parentFileNameHint,
    differencing VHD/VHDX/VDI, QED and qcow (v1) backing files.  Glance refuses qcow2
    backing files; qcowlib also
    refuses the other formats' parents, which Glance's inspector does not look for.
    qcowlib cannot read a differencing VHD, VHDX or VDI at all, so every policy refuses
    those (the findings are structural)."""
    checks = {
        "qcow2": _qcow2_backing,
        "vmdk": _vmdk_parent,
        "vpc": _vhd_parent,
        "vhdx": _vhdx_parent,
        "vdi": _vdi_parent,
        "qcow": backing_of("qcow"),
        "qed": backing_of("qed"),
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
    bit = bool(f.incompatible_features & qcow2_header.INCOMPAT_DATA_FILE)
    name = f.data_file_extension
    if not bit and name is None:
        return
    what = f" {shown_name(name)}" if name else ""
    if bit:
        yield ctx.error(
            f"this qcow2 keeps its guest data in an external data file{what} (data_file, "
            "incompatible feature bit 2): the image itself holds only metadata, validate "
            "does not open the data file, and Glance refuses such images. Make a "
            f"self-contained image first: {convert_cmd(ctx)}",
            72,
        )
    else:
        yield ctx.error(
            f"this qcow2 has an external data file extension naming{what} although its "
            "data-file feature bit is clear; a tool honouring the extension would read "
            f"another file. Rewrite it: {convert_cmd(ctx)}"
        )
