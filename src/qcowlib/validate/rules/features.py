"""What an image needs from whoever reads it: qcow2 feature bits, and encryption."""

from __future__ import annotations

from qcowlib.errors import QcowlibError
from qcowlib.formats.luks.probe import LUKS_MAGIC
from qcowlib.formats.qcow2 import header as qcow2_header
from qcowlib.validate import formats as fm
from qcowlib.validate.engine import Context
from qcowlib.validate.model import rule
from qcowlib.validate.rules._common import Findings, convert_cmd
from qcowlib.validate.structures import luks_header

__all__ = ["encrypted", "unknown_features"]


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
    if beyond & qcow2_header.INCOMPAT_EXTL2:
        yield ctx.error(
            "this qcow2 uses extended L2 entries (subclusters, incompatible feature bit 4), "
            "which Glance's inspector refuses (it accepts incompatible features 0-3 only). "
            f"Rewrite it without them: {convert_cmd(ctx)}",
            72,
        )
    unknown = beyond & ~qcow2_header.INCOMPAT_EXTL2
    if unknown:
        yield ctx.error(
            f"this qcow2 sets incompatible feature bits {unknown:#x} that neither QEMU nor "
            "Glance know; nothing can read it safely",
            72,
            structural=bool(unknown & ~qcow2_header.INCOMPAT_KNOWN),
        )


def _qcow1_encrypted(ctx: Context) -> Findings:
    from qcowlib.formats.qcow import codec as qcow1

    try:
        rec = qcow1.HEADER.parse(ctx.head[: qcow1.HEADER_SIZE])
    except QcowlibError:
        return
    if rec.crypt_method:
        yield ctx.error(
            f"this qcow (v1) image is encrypted (crypt_method {rec.crypt_method}, AES-CBC), "
            "which qcowlib does not read and QEMU no longer supports in system emulators; "
            "decrypt it first (qemu-img convert with --object secret)",
            36,
            structural=True,
        )


@rule("encrypted", formats=["luks", "qcow2"])
def encrypted(ctx: Context) -> Findings:
    """No encryption: LUKS volumes, encrypted qcow2 and qcow (v1) (whose magic Glance's
    inspector takes for qcow2, so the rule runs for it).  Stricter than Glance, which
    accepts LUKS1 declared raw: an encrypted image cannot be checked inside.  qcowlib
    does not read encrypted images either, so every policy refuses them (structural)."""
    if "luks" in ctx.formats and ctx.head[:6] == LUKS_MAGIC:
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
                structural=True,
            )
        else:
            cipher = f" ({fm.printable(h.cipher)})" if h.cipher.strip("-") else ""
            yield ctx.error(
                f"this is a LUKS-encrypted volume{cipher}: nothing inside it can be checked "
                "without its key. Decrypt it (qemu-img convert with --object secret and "
                "--image-opts driver=luks) and validate the plain image",
                structural=True,
            )
    if ctx.format == "qcow":
        yield from _qcow1_encrypted(ctx)
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
                structural=True,
            )
        elif f.crypt_method:
            yield ctx.error(
                f"this qcow2 is encrypted (crypt_method {f.crypt_method}); nothing inside it "
                "can be checked without its key. Decrypt it first",
                32,
                structural=True,
            )
