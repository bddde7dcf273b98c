"""``flatten``: a backing chain as one standalone image (DST ``-`` is stdout)."""

from __future__ import annotations

import argparse

from qcowlib.cli import add_input_format, parse_options, wants_option_help
from qcowlib.cli.helptext import examples
from qcowlib.formats import registry


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "flatten",
        help="write a backing chain as one standalone image",
        description="Write an image and everything under it (its backing chain) as one "
        "standalone image, ready for Glance.  DST '-' writes it to stdout as a stream: "
        "no temporary file, the same bytes as the file.",
        epilog=examples(
            ("qcowlib flatten overlay.qcow2 flat.qcow2", "one qcow2 holding the whole chain"),
            (
                "qcowlib flatten -c -O qcow2 overlay.qcow2 - > flat-compressed.qcow2",
                "compressed, streamed to stdout",
            ),
        ),
    )
    add_input_format(p)
    p.add_argument(
        "-O",
        dest="out_format",
        default="qcow2",
        choices=registry.flattenable(),
        metavar="FMT",
        help="the output format (default qcow2): " + ", ".join(registry.flattenable()),
    )
    p.add_argument(
        "-o",
        dest="options",
        metavar="OPTIONS",
        help="output format options, key=value,... (-o help lists them)",
    )
    p.add_argument("-c", dest="compress", action="store_true", help="compress the output's data")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    p.add_argument("src", metavar="SRC", help="the top image of the chain")
    p.add_argument("dst", metavar="DST", help="the new image, or - for stdout")
    p.set_defaults(func=_cmd_flatten)


def _cmd_flatten(args: argparse.Namespace) -> int:
    from qcowlib.cli.progress import ProgressBar
    from qcowlib.ops.flatten import flatten

    options = parse_options(args.options)
    if wants_option_help(options, args.out_format):
        return 0
    bar = ProgressBar() if args.progress else None
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
