"""``qcowlib bitmap``: persistent dirty bitmaps, as ``qemu-img bitmap``."""

from __future__ import annotations

import argparse
from typing import Any

from qcowlib.cli import INPUT_FORMATS
from qcowlib.cli.helptext import examples


class _Op(argparse.Action):
    """Collect the operations in command-line order, as qemu-img applies them."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        ops = list(getattr(namespace, "actions", None) or [])
        ops.append((self.const, values if isinstance(values, str) else None))
        namespace.actions = ops


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bitmap`` subcommand."""
    p = sub.add_parser(
        "bitmap",
        help="add, remove, clear, enable, disable or merge bitmaps",
        description="Change the persistent dirty bitmaps of a qcow2 image in place, as "
        "qemu-img bitmap; the operations run in the order given.",
        epilog=examples(
            ("qcowlib bitmap --add -g 64k disk.qcow2 backup-1", "start tracking writes"),
            ("qcowlib bitmap --remove disk.qcow2 backup-1", "drop that bitmap"),
        ),
    )
    for op, text in (
        ("add", "create bitmap NAME (enabled, empty)"),
        ("remove", "delete bitmap NAME and free its clusters"),
        ("clear", "reset every bit of bitmap NAME"),
        ("enable", "let bitmap NAME record writes (the 'auto' flag)"),
        ("disable", "stop bitmap NAME recording writes"),
    ):
        p.add_argument(f"--{op}", action=_Op, nargs=0, const=op, dest="actions", help=text)
    p.add_argument(
        "--merge",
        action=_Op,
        const="merge",
        dest="actions",
        metavar="SOURCE",
        help="set in NAME every bit set in bitmap SOURCE (of this image, or of -b)",
    )
    p.add_argument("-g", dest="granularity", metavar="GRANULARITY",
                   help="with --add: bytes per bit (power of two, 512..2G; default "
                   "the cluster size within 4k..64k)")  # fmt: skip
    p.add_argument("-b", dest="source_file", metavar="SRC_FILE", help="--merge source image")
    p.add_argument(
        "-F", dest="source_format", choices=INPUT_FORMATS, help="format of -b (probed if not given)"
    )
    p.add_argument("-f", dest="format", choices=INPUT_FORMATS, help="image format (probed)")
    p.add_argument("filename", help="the image")
    p.add_argument("bitmap", help="the bitmap's name")
    p.set_defaults(func=_cmd_bitmap, actions=None)


def _cmd_bitmap(args: argparse.Namespace) -> int:
    from qcowlib._units import parse_size
    from qcowlib.ops.bitmap import bitmap

    bitmap(
        args.filename,
        args.bitmap,
        args.actions or [],
        granularity=parse_size(args.granularity) if args.granularity is not None else None,
        source_file=args.source_file,
        source_fmt=args.source_format,
        fmt=args.format,
    )
    return 0
