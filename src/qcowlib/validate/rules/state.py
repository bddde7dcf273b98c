"""The state and size of an image: qcow2 corrupt and dirty bits, qcowlib's consistency
check, and the virtual and file sizes against the policy's limits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qcowlib.errors import FormatError, QcowlibError
from qcowlib.formats.qcow2 import header as qcow2_header
from qcowlib.validate.engine import Context
from qcowlib.validate.model import rule
from qcowlib.validate.rules._common import Findings, describe, human, quote

if TYPE_CHECKING:
    from qcowlib.ops.check import CheckReport

__all__ = ["check", "corrupt", "dirty", "image_size", "virtual_size"]


def _incompat(ctx: Context) -> int:
    try:
        f = ctx.qcow2_fields()
    except QcowlibError:
        return 0
    return f.incompatible_features if f.version == 3 else 0


@rule("corrupt", formats=["qcow2"])
def corrupt(ctx: Context) -> Findings:
    """The qcow2 corrupt bit is clear (QEMU sets it when it finds inconsistent metadata)."""
    if _incompat(ctx) & qcow2_header.INCOMPAT_CORRUPT:
        yield ctx.error(
            "this qcow2 is marked corrupt: QEMU found inconsistent metadata in it and stopped "
            f"writing to it. Run `qcowlib check -r all {quote(ctx.path)}` (and check the data), "
            "or re-create the image",
            72,
            structural=True,
        )


@rule("dirty", formats=["qcow2"], severity="warning")
def dirty(ctx: Context) -> Findings:
    """The qcow2 dirty bit is clear (set while open with lazy refcounts)."""
    if _incompat(ctx) & qcow2_header.INCOMPAT_DIRTY:
        yield ctx.warning(
            "this qcow2 was not closed cleanly (dirty bit: its refcounts may be stale); run "
            f"`qcowlib check -r all {quote(ctx.path)}` before uploading it",
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
            f"virtual size {human(size)} is above this policy's limit of {human(limit)} "
            "(Glance's image_size_cap); shrink the disk or use a policy with a larger "
            "max_virtual_size"
        )


@rule("image-size")
def image_size(ctx: Context) -> Findings:
    """The file is no larger than Glance's image_size_cap (Glance answers 413 above it)."""
    cap = ctx.policy.image_size_cap
    if ctx.size > cap:
        yield ctx.error(
            f"the file is {human(ctx.size)}, above Glance's image_size_cap of {human(cap)} "
            "(Glance answers 413); compress it (`qcowlib convert -c -O qcow2 SRC DST`) or "
            "raise the cap"
        )


@rule("check", formats=["qcow2"])
def check(ctx: Context) -> Findings:
    """qcowlib's qcow2 consistency check (as ``qemu-img check``) finds no corruption;
    leaks are warnings.  Skipped where the check would open other files (backing or
    data file) and for encrypted images."""
    if not ctx.policy.run_check or ctx.format != "qcow2":
        return
    try:
        f = ctx.qcow2_fields()
        ctx.qcow2_header()
    except QcowlibError:
        return  # structure and friends report it
    if (
        f.backing_file_offset
        or f.incompatible_features
        & (qcow2_header.INCOMPAT_DATA_FILE | ~qcow2_header.INCOMPAT_KNOWN)
        or f.data_file_extension is not None
        or f.crypt_method
    ):
        return
    # Imported here: the check reads whole tables with numpy, which a metadata-only
    # validation of another format has no need to load.
    from qcowlib.ops.check import check as check_image

    try:
        report = check_image(ctx.same_file_path(), "qcow2")
    except FormatError as exc:
        yield ctx.error(
            f"qcowlib check cannot read this qcow2: {describe(exc)}", exc.offset, structural=True
        )
        return
    except QcowlibError as exc:
        yield ctx.warning(f"qcowlib check did not run: {describe(exc)}")
        return
    except Exception as exc:  # the check is extra safety, not a safety rule itself
        yield ctx.warning(f"qcowlib check failed internally ({type(exc).__name__}: {exc})")
        return
    yield from _check_findings(ctx, report)


def _check_findings(ctx: Context, report: CheckReport) -> Findings:
    if report.failure:
        yield ctx.error(f"qcowlib check could not complete: {report.failure}", structural=True)
    if report.corruptions:
        cmd = f"`qcowlib check -r all {quote(ctx.path)}`"
        yield ctx.error(
            f"qcowlib check found {report.corruptions} corruption(s) in this qcow2's metadata: "
            f"data may be wrong and writes may damage it. Repair with {cmd} and re-check, or "
            "re-create the image",
            structural=True,
        )
    if report.check_errors:
        yield ctx.error(
            f"qcowlib check hit {report.check_errors} error(s) while checking this qcow2",
            structural=True,
        )
    if report.leaks:
        yield ctx.warning(
            f"qcowlib check found {report.leaks} leaked cluster(s): wasted space, no harm to "
            f"data (`qcowlib check -r leaks {quote(ctx.path)}` reclaims it)"
        )
