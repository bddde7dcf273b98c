"""``dd``: copy a block range of an image into a new image, as ``qemu-img dd``.

qemu-img's arithmetic is kept exactly, quirk included: the end of the copy is
``min(input size, count * bs)`` and the copy starts at ``skip * bs``, so ``count``
counts from the start of the input, not from ``skip`` (``bs=64k count=3 skip=1`` copies
two blocks).  The output's virtual size is that length rounded up to 512 bytes, as
qemu-img creates it.  The output is created with the format's ``create`` and written
through its in-place writer under a temporary name, renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from qcowlib.errors import InvalidArgument, QcowlibError, UnsupportedFeature

if TYPE_CHECKING:
    from qcowlib.core.copy import Progress
    from qcowlib.core.disk import Disk, Writer

__all__ = ["DdArgs", "dd", "parse_dd_operands"]

#: qemu-img dd's limit on ``bs`` (an int).
MAX_BS: Final = 2**31 - 1
_SIZE_HINT: Final = (
    "You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, "
    "terabytes, petabytes and exabytes."
)


@dataclass(frozen=True)
class DdArgs:
    """qemu-img dd's operands: ``if=``, ``of=``, ``bs=`` (default 512), ``count=``,
    ``skip=`` (in blocks of ``bs``)."""

    src: str
    dst: str
    bs: int = 512
    count: int | None = None
    skip: int = 0


def parse_dd_operands(operands: list[str]) -> DdArgs:
    """``key=value`` operands as qemu-img dd takes them; raises :class:`InvalidArgument`
    with qemu-img's messages."""
    from qcowlib._units import parse_size

    values: dict[str, str] = {}
    for op in operands:
        key, sep, value = op.partition("=")
        if not sep or key not in ("if", "of", "bs", "count", "skip"):
            raise InvalidArgument(f"unrecognized operand {key}")
        values[key] = value

    def number(key: str) -> int | None:
        if key not in values:
            return None
        try:
            n = parse_size(values[key])
        except QcowlibError:
            n = -1
        if key == "bs" and not 1 <= n <= MAX_BS:
            raise InvalidArgument(f"Invalid bs specified. Must be between 1 and {MAX_BS}.")
        if n < 0:
            raise InvalidArgument(f"Invalid {key} specified. {_SIZE_HINT}")
        return n

    bs, count, skip = number("bs"), number("count"), number("skip")
    if not values.get("if") or not values.get("of"):
        raise InvalidArgument("Must specify both input and output files")
    return DdArgs(values["if"], values["of"], bs or 512, count, skip or 0)


def dd(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    bs: int = 512,
    count: int | None = None,
    skip: int = 0,
    src_format: str | None = None,
    out_format: str = "raw",
    progress: Progress | None = None,
) -> int:
    """Copy as ``qemu-img dd if=SRC of=DST bs= count= skip=`` does (``count`` and
    ``skip`` in blocks of ``bs``); returns the number of bytes copied.

    Raises :class:`InvalidArgument` when ``skip`` lies past the end of the input (qemu-img
    prints an error there but exits 0 with an empty output; qcowlib fails and leaves no
    output), :class:`UnsupportedFeature` for output formats without an in-place writer.
    """
    from qcowlib.formats import registry
    from qcowlib.formats.opener import open_disk

    if not 1 <= bs <= MAX_BS or skip < 0 or (count is not None and count < 0):
        raise InvalidArgument("bs must be 1..2**31-1, count and skip not negative")
    args = DdArgs(os.fspath(src), os.fspath(dst), bs, count, skip)
    entry = registry.by_name(out_format)
    if entry.create is None or entry.writer is None:
        raise UnsupportedFeature(f"dd -O {out_format} is not supported yet (raw, qcow2 are)")
    with open_disk(args.src, src_format) as disk:
        end = disk.virtual_size
        if args.count is not None:
            end = min(end, args.count * args.bs)
        start = args.skip * args.bs
        if start > end:
            raise InvalidArgument(f"{args.src}: cannot skip to specified offset")
        length = end - start
        _write_output(disk, args, out_format, start, length, progress)
    return length


def _write_output(
    disk: Disk, args: DdArgs, out_format: str, start: int, length: int, progress: Progress | None
) -> None:
    from qcowlib.formats import registry
    from qcowlib.ops.create import create

    real = os.path.realpath(args.dst)
    if real in {os.path.realpath(d.filename) for d in disk.chain}:
        raise InvalidArgument(f"output {args.dst} is the same file as an input")
    folder = os.path.dirname(os.path.abspath(args.dst))
    tmp = os.path.join(folder, f".qcowlib-dd-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        create(tmp, out_format, -(-length // 512) * 512)
        target: Writer = registry.by_name(out_format).implementation("writer")(tmp)
        try:
            _copy_range(disk, target, start, length, args.bs, progress)
            target.flush()
        finally:
            target.close()
        os.replace(tmp, args.dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _copy_range(
    disk: Disk, target: Writer, start: int, length: int, bs: int, progress: Progress | None
) -> None:
    """``[start, start + length)`` of ``disk`` to offset 0 of ``target``; ranges that
    read as zeros are left out (the new image reads as zeros there already)."""
    from qcowlib.core.hostfile import aligned_buffer

    chunk = max(bs, 4 << 20) // bs * bs
    buf = aligned_buffer(chunk)
    for ext in disk.extents(start, length) if length else ():
        if not ext.reads_zero:
            pos = ext.start
            while pos < ext.end:
                n = min(chunk, ext.end - pos)
                view = buf[:n]
                disk.read_extent(ext.clip(pos, pos + n), view)
                target.write(pos - start, view)
                pos += n
        if progress:
            progress(ext.end - start, length)
