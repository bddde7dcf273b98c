"""``qcowlib check``: consistency check and repair, with qemu-img check's output.

Messages about individual problems go to stderr and the summary to stdout, as qemu-img
prints them.  Exit status: 0 clean, 2 corruptions, 3 leaks only (after a repair: of the
repaired image), 1 when the check fails or cannot start, 63 for formats with nothing to
check.
"""

from __future__ import annotations

import argparse
import sys

from qcowlib.cli import INPUT_FORMATS, Failed, add_output, add_read_options, print_json


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``check`` subcommand."""
    p = sub.add_parser("check", help="check an image for consistency (and repair it)")
    p.add_argument("-f", dest="format", choices=INPUT_FORMATS)
    add_output(p)
    p.add_argument(
        "-r",
        dest="repair",
        choices=("leaks", "all"),
        help="repair leaked clusters only, or all fixable errors (opens the image read-write)",
    )
    add_read_options(p)
    p.add_argument("filename")
    p.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    from qcowlib.ops.check import CheckNotSupported, check

    try:
        report = check(
            args.filename,
            args.format,
            args.repair,
            backing_policy=args.backing_policy,
            force_share=args.force_share,
        )
    except CheckNotSupported as exc:
        raise Failed(str(exc), CheckNotSupported.status) from None
    for line in report.messages:
        sys.stderr.write(line + "\n")
    if report.failure is not None:
        raise Failed(report.failure, 1)
    if args.output == "json":
        print_json(report.to_json())
    else:
        sys.stdout.write(report.human())
    if report.check_errors:
        raise Failed("Check failed", 1)
    return report.status
