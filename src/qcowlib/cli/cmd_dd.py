"""``qcowlib dd``: copy blocks of an image into a new one, as ``qemu-img dd``."""

from __future__ import annotations

import argparse

from qcowlib.cli import INPUT_FORMATS
from qcowlib.cli.helptext import examples


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``dd`` subcommand."""
    p = sub.add_parser(
        "dd",
        help="copy a range of blocks into a new image (as qemu-img dd)",
        description="Copy count blocks of bs bytes, from block skip on, of an image's guest "
        "content into a new image, with qemu-img dd's arithmetic.",
        epilog=examples(
            ("qcowlib dd bs=64k count=4 if=disk.qcow2 of=head.raw", "the first 256 KiB, raw"),
            ("qcowlib dd -O qcow2 bs=4k if=disk.qcow2 of=copy.qcow2", "the whole disk, as qcow2"),
        ),
    )
    p.add_argument("-f", dest="format", choices=INPUT_FORMATS, help="input format (probed)")
    p.add_argument(
        "-O", dest="out_format", default="raw", help="output format (raw or qcow2; default raw)"
    )
    p.add_argument(
        "operands",
        nargs="+",
        metavar="OPERAND",
        help="if=SRC of=DST [bs=N (default 512)] [count=BLOCKS] [skip=BLOCKS]",
    )
    p.set_defaults(func=_cmd_dd)


def _cmd_dd(args: argparse.Namespace) -> int:
    from qcowlib.ops.dd import dd, parse_dd_operands

    ops = parse_dd_operands(args.operands)
    dd(
        ops.src,
        ops.dst,
        bs=ops.bs,
        count=ops.count,
        skip=ops.skip,
        src_format=args.format,
        out_format=args.out_format,
    )
    return 0
