"""``create``: qemu-img create's options and output."""

from __future__ import annotations

import argparse
import sys

from qcowlib.cli import add_format_options, parse_options, wants_option_help
from qcowlib.cli.helptext import examples
from qcowlib.formats import registry


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "create",
        help="create a new image",
        description="Create an empty image, or an overlay over a backing file, as qemu-img create.",
        epilog=examples(
            ("qcowlib create -f qcow2 new.qcow2 10G", "an empty 10 GiB qcow2"),
            (
                "qcowlib create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2",
                "an overlay over base.qcow2, of its size",
            ),
        ),
    )
    p.add_argument(
        "-f",
        dest="format",
        default="raw",
        choices=registry.creatable(),
        metavar="FMT",
        help="the new image's format (default raw): " + ", ".join(registry.creatable()),
    )
    add_format_options(
        p,
        "format options, key=value,... (may repeat; -o help lists them), e.g. "
        "subformat=fixed, preallocation=falloc",
    )
    p.add_argument(
        "-b",
        dest="backing",
        metavar="BACKING",
        help="make an overlay over BACKING (relative to the new image's directory)",
    )
    p.add_argument(
        "-F",
        dest="backing_format",
        metavar="FMT",
        help="the format of BACKING (required with -b: never guessed)",
    )
    p.add_argument(
        "-u",
        dest="unsafe",
        action="store_true",
        help="do not open the backing file (it may not exist yet; SIZE is then required)",
    )
    p.add_argument("-q", dest="quiet", action="store_true", help="do not print the Formatting line")
    p.add_argument(
        "filename", nargs="?", metavar="FILE", help="the new image (not needed with -o help)"
    )
    p.add_argument(
        "size",
        nargs="?",
        metavar="SIZE",
        help="virtual size, bytes or with a k/M/G/T/P/E suffix (default: the backing's)",
    )
    p.set_defaults(func=_cmd_create)


def _cmd_create(args: argparse.Namespace) -> int:
    from qcowlib._units import parse_size
    from qcowlib.errors import InvalidArgument
    from qcowlib.ops.create import create, describe

    if args.backing is not None and args.backing_format is None:
        raise InvalidArgument("-b needs -F: a backing format is never guessed")
    options: dict[str, str] = {}
    for text in args.options:
        options.update(parse_options(text))
    if wants_option_help(options, args.format):
        return 0
    if args.filename is None:
        raise InvalidArgument("Expecting image file name")
    size = parse_size(args.size) if args.size is not None else None
    result = create(
        args.filename,
        args.format,
        size,
        options=options,
        backing=args.backing,
        backing_fmt=args.backing_format,
        unsafe=args.unsafe,
    )
    if not args.quiet:
        sys.stdout.write(describe(args.filename, args.format, result) + "\n")
    return 0
