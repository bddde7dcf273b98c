"""``flatten``: a backing chain as one standalone image (DST ``-`` is stdout)."""

from __future__ import annotations

import argparse

from qcowlib.cli import INPUT_FORMATS, parse_options, wants_option_help
from qcowlib.formats import registry


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("flatten", help="write a backing chain as one standalone image")
    p.add_argument("-f", dest="format", choices=INPUT_FORMATS)
    p.add_argument("-O", dest="out_format", default="qcow2", choices=registry.flattenable())
    p.add_argument("-o", dest="options")
    p.add_argument("-c", dest="compress", action="store_true")
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing but errors")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=_cmd_flatten)


def _cmd_flatten(args: argparse.Namespace) -> int:
    from qcowlib.cli.progress import ProgressBar
    from qcowlib.ops.flatten import flatten

    options = parse_options(args.options)
    if wants_option_help(options, args.out_format):
        return 0
    bar = ProgressBar() if args.progress and not args.quiet else None
    try:
        flatten(
            args.src,
            args.dst,
            args.out_format,
            src_format=args.format,
            options=options,
            compress=args.compress,
            progress=bar.update if bar else None,
        )
    finally:
        if bar:
            bar.finish()
    return 0
