"""``create``: qemu-img create's options and output."""

from __future__ import annotations

import argparse
import sys

from qcowlib.cli import parse_options, wants_option_help
from qcowlib.formats import registry


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("create", help="create a new image")
    p.add_argument("-f", dest="format", default="raw", choices=registry.creatable())
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-b", dest="backing")
    p.add_argument("-F", dest="backing_format")
    p.add_argument("-u", dest="unsafe", action="store_true", help="do not open the backing file")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing but errors")
    p.add_argument("filename")
    p.add_argument("size", nargs="?")
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
