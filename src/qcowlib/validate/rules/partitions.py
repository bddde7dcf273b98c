"""Partition tables of raw disks: the MBR and the GPT (UEFI 2.10 chapter 5)."""

from __future__ import annotations

from qcowlib.errors import QcowlibError
from qcowlib.validate import formats as fm
from qcowlib.validate.engine import Context
from qcowlib.validate.model import rule
from qcowlib.validate.rules._common import Findings

__all__ = ["gpt", "mbr"]


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


@rule("gpt", severity="warning")
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
    import zlib  # a C extension: loaded only for a disk with a GPT

    array = ctx.read(at, length)
    if len(array) < length:
        yield ctx.warning("GPT partition entry array lies past the end of the file", at)
    elif zlib.crc32(array) != header.partition_entry_array_crc32:
        yield ctx.warning("GPT partition entry array CRC32 is wrong", at)
