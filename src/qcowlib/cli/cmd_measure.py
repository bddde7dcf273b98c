"""``measure``: qemu-img measure's options and output (``--size`` included)."""

from __future__ import annotations

import argparse
import sys

from qcowlib.cli import (
    add_format_options,
    add_input_format,
    add_output,
    add_read_options,
    parse_options,
    print_json,
)
from qcowlib.cli.helptext import examples


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "measure",
        help="compute the file size a new image needs",
        description="Compute how large a file converting SRC (or an empty image of "
        "--size) to another format makes, as qemu-img measure.",
        epilog=examples(
            ("qcowlib measure -O qcow2 disk.raw", "required and fully allocated sizes"),
            ("qcowlib measure --size 10G -O qcow2 -o cluster_size=2M", "an empty 10 GiB image"),
        ),
    )
    add_input_format(p)
    # As qemu-img, the output format defaults to raw and an unknown one is an error (1).
    p.add_argument(
        "-O",
        dest="out_format",
        default="raw",
        metavar="FMT",
        help="the output format (default raw)",
    )
    add_format_options(
        p,
        "output format options, key=value,... (may repeat)",
    )
    p.add_argument("--size", dest="size", help="measure an empty image of SIZE instead of SRC")
    add_output(p)
    add_read_options(p)
    p.add_argument("filename", nargs="?", metavar="SRC", help="the image to measure")
    p.set_defaults(func=_cmd_measure)


def _valid_option_list(text: str) -> bool:
    """qemu-img's ``is_valid_option_list``: no empty list, no leading comma, and an
    even number of trailing commas (``,,`` escapes a comma)."""
    if not text or text.startswith(","):
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def _cmd_measure(args: argparse.Namespace) -> int:
    from qcowlib._units import parse_size
    from qcowlib.errors import InvalidArgument
    from qcowlib.ops.measure import measure, render_human

    options: dict[str, str] = {}
    for text in args.options:
        if not _valid_option_list(text):
            raise InvalidArgument(f"Invalid option list: {text}")
        options.update(parse_options(text))
    size = None
    if args.size is not None:
        try:
            size = parse_size(args.size)
        except InvalidArgument:
            raise InvalidArgument(
                "Invalid image size specified. You may use k, M, G, T, P or E suffixes for "
                "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
            ) from None
    result = measure(
        args.filename,
        args.out_format,
        options=options,
        size=size,
        src_format=args.format,
        backing_policy=args.backing_policy,
        force_share=args.force_share,
    )
    if args.output == "json":
        print_json(result)
    else:
        sys.stdout.write(render_human(result))
    return 0
