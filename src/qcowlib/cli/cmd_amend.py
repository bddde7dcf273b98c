"""``qcowlib amend``: change image options in place, as ``qemu-img amend``."""

from __future__ import annotations

import argparse
import sys

from qcowlib.cli import INPUT_FORMATS, add_format_options, check_cache, parse_options
from qcowlib.cli.helptext import examples


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``amend`` subcommand."""
    p = sub.add_parser(
        "amend",
        help="change format options of an image in place",
        description="Change a qcow2 image's format options (compat, refcount_bits, "
        "lazy_refcounts, ...) in place, as qemu-img amend.",
        epilog=examples(
            ("qcowlib amend -o refcount_bits=8 disk.qcow2", "rewrite the refcount structures"),
            (
                "qcowlib amend -o compat=0.10,refcount_bits=16 disk.qcow2",
                "downgrade to the v2 format (which has 16-bit refcounts only)",
            ),
        ),
    )
    add_format_options(
        p,
        "qcow2: compat=0.10|1.1, lazy_refcounts=on|off, refcount_bits=N, "
        "backing_file=NAME, backing_fmt=FMT, size=SIZE (-o help lists them)",
    )
    p.add_argument("-f", dest="format", choices=INPUT_FORMATS, help="image format (probed)")
    p.add_argument(
        "-t", dest="cache", metavar="CACHE", help="cache mode (accepted; writes are flushed)"
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing but errors")
    p.add_argument("filename", help="the image to change")
    p.set_defaults(func=_cmd_amend)


def _cmd_amend(args: argparse.Namespace) -> int:
    from qcowlib.cli.progress import ProgressBar
    from qcowlib.ops.amend import amend

    check_cache(args.cache)
    options = parse_options(",".join(args.options))
    if options.get("help") == "on" or options.get("?") == "on":
        from qcowlib.ops.amend import amend_option_help
        from qcowlib.ops.modify import _format_of

        sys.stdout.write(amend_option_help(args.format or _format_of(args.filename, None)))
        return 0
    bar = ProgressBar() if args.progress and not args.quiet else None
    try:
        amend(args.filename, options, fmt=args.format, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.finish()
    return 0
