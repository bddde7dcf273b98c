"""Format identity: what the content is, against what it is declared as."""

from __future__ import annotations

from qcowlib.validate import formats as fm
from qcowlib.validate.engine import Context
from qcowlib.validate.model import Finding, rule
from qcowlib.validate.rules._common import NAMES, Findings, convert_cmd

__all__ = ["banned_format", "format_ambiguous", "format_match"]


def _glance_name(fmt: str) -> str:
    return fm.QEMU_TO_INSPECTOR.get(fmt, fmt)


@rule("format-match")
def format_match(ctx: Context) -> Findings:
    """The declared disk_format matches the content, as Glance's
    ``require_image_format_match`` demands (raw may hold anything, as in Glance)."""
    declared = ctx.disk_format
    if declared is None:
        return
    if declared not in ctx.policy.disk_formats:
        yield _not_accepted(ctx, declared)
        return
    seen = ctx.inspector.format
    if seen is None:
        return  # format-ambiguous reports it
    if seen == declared:
        if declared == "raw":
            yield from _raw_as_seen(ctx)
    elif seen == "raw" and declared not in fm.INSPECTOR_FORMATS:
        return  # ami/ari/aki and friends: Glance cannot inspect them, raw content passes
    elif declared == "raw":
        yield from _container_declared_raw(ctx, seen)
    else:
        yield _mismatch(ctx, declared, seen)


def _not_accepted(ctx: Context, declared: str) -> Finding:
    """A disk_format the policy (Glance's disk_formats) does not list."""
    formats = ctx.policy.disk_formats
    hint = ""
    if _glance_name(declared) in formats:
        hint = f"; Glance calls it {_glance_name(declared)!r}"
    return ctx.error(
        f"disk_format {declared!r} is not one Glance accepts "
        f"(its disk_formats: {', '.join(formats)}){hint}"
    )


def _raw_as_seen(ctx: Context) -> Findings:
    """Declared raw, and Glance's inspector sees raw: what qcowlib detects may differ."""
    ours = ctx.format
    if ours == "vpc" and ctx.probe.detail == "footer-only":
        yield ctx.warning(
            "declared raw, and the content is a fixed VHD: a VM sees its disk followed "
            "by the 512-byte VHD footer (harmless; `qemu-img convert -f vpc -O raw` "
            "gives the plain disk)"
        )
    elif ours not in ("raw", "iso"):
        # A container declared raw must not pass as raw, even where Glance's
        # inspector would let it through.
        name = NAMES.get(ours, ours)
        yield ctx.error(
            f"declared raw, but the content is a {name} image (qcowlib detects "
            f"{ours}) that Glance's inspector does not recognise; a VM given it as raw "
            f"would see the {name} container, not its disk: convert it to raw first "
            f"(`qcowlib convert -O raw ...`)"
        )


def _container_declared_raw(ctx: Context, seen: str) -> Findings:
    """A recognised container declared raw is an error, though Glance stores it: no VM
    would boot from it as intended (CONTRACT, validate).  Not a disk with a partition
    table (gpt), a bootable ISO, or LUKS (the `encrypted` rule says why)."""
    if seen in ("gpt", "iso", "luks"):
        return
    ours = ctx.format
    theirs = fm.INSPECTOR_TO_QEMU.get(seen, seen)
    if ours not in (theirs, "raw", "iso"):
        # The inspector's name is not the format (legacy QCOW looks like qcow2).
        name = NAMES.get(ours, ours)
        yield ctx.error(
            f"declared raw, but the content is a {name} image (Glance's inspector "
            f"takes it for {seen}); Glance would store it, and no VM would boot from "
            f"it as intended: convert it first ({convert_cmd(ctx)})"
        )
        return
    shown = NAMES.get(theirs, seen)
    fix = (
        f"declare --disk-format {seen} instead"
        if seen in ctx.policy.disk_formats
        else f"convert it first: {convert_cmd(ctx)}"
    )
    yield ctx.error(
        f"declared raw, but the content is a {shown} image; Glance would store it "
        f"as raw, and no VM would boot from it as intended: a VM sees the {shown} "
        f"container as its disk ({fix})"
    )


def _mismatch(ctx: Context, declared: str, seen: str) -> Finding:
    """Declared one format, and Glance's inspector sees another: Glance's
    ``require_image_format_match`` refuses it (an error where the policy requires it)."""
    ours = ctx.format
    shown = "raw (a disk with a partition table, which Glance calls gpt)" if seen == "gpt" else seen
    note = ""
    if ours == "vpc" and ctx.probe.detail == "footer-only":
        note = (
            "; Glance's inspector does not recognise fixed VHDs (they have only a footer) "
            "and sees raw: declare --disk-format raw"
        )
    elif ours != fm.INSPECTOR_TO_QEMU.get(shown, shown) and ours != "raw":
        note = f" (qcowlib detects {NAMES.get(ours, ours)})"
    text = (
        f"declared disk_format {declared!r}, but the content is {shown}{note}; Glance refuses "
        f"a mismatch (require_image_format_match)"
    )
    if not note:
        suggest = "raw" if seen == "gpt" else shown
        text += f": declare --disk-format {suggest}, or convert the image to {declared}"
    if ctx.policy.require_image_format_match:
        return ctx.error(text)
    return ctx.warning(text)


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
    """Formats Glance always refuses: QED, and legacy QCOW version 1 (qcowlib reads
    both, and can convert them)."""
    if "qed" in ctx.inspector.matches or ctx.format == "qed":
        yield ctx.error(
            "this is a QED image, a format Glance refuses outright; convert it: " + convert_cmd(ctx)
        )
    if ctx.format == "qcow":
        yield ctx.error(
            "this is a legacy QCOW version 1 image, which Glance refuses; convert it: "
            + convert_cmd(ctx),
            4,
        )
