"""``validate``: check an image against a policy before uploading it.

Exit status: 0 accepted, 1 rejected (the report says why, on stdout).  A file that
cannot be read at all (missing, a directory, no permission) is also 1, with one
``qcowlib: error: ...`` line on stderr and no report.
"""

from __future__ import annotations

import argparse
import sys

from qcowlib.cli import add_output, print_json
from qcowlib.cli.helptext import examples
from qcowlib.formats import registry

#: Formats ``-f`` takes: every format the probe knows.
_FORMATS = registry.known()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "validate",
        help="check an image against a policy (e.g. what Glance accepts)",
        description=(
            "Check an image file against a policy: glance (what Glance 33 refuses on "
            "upload), strict (every finding is an error) or permissive (only images that "
            "do not parse are refused).  Only the image file is opened: backing files, "
            "data files and VMDK extents it names are reported, never opened.  Exit "
            "status 0: accepted, 1: rejected or unreadable."
        ),
        epilog=examples(
            (
                "qcowlib validate --disk-format qcow2 overlay.qcow2",
                "refused (exit 1): it has a backing file; flatten it first",
            ),
            ("qcowlib validate --list-rules", "every rule, its severity and what it checks"),
        ),
    )
    p.add_argument(
        "-f",
        dest="format",
        choices=_FORMATS,
        help="also parse the file as FMT (content rules always run)",
    )
    p.add_argument(
        "--policy", default="glance", metavar="NAME", help="glance (default), strict or permissive"
    )
    p.add_argument(
        "--disk-format",
        dest="disk_format",
        metavar="FMT",
        help="the disk_format the image will be declared as (default: as detected)",
    )
    p.add_argument(
        "--list-rules",
        action="store_true",
        help="list the rules (built-in and from hooks) with their severity, and exit",
    )
    add_output(p)
    p.add_argument("filename", metavar="FILE", nargs="?", help="the image file")
    p.set_defaults(func=_cmd_validate, parser=p)


def _cmd_validate(args: argparse.Namespace) -> int:
    from qcowlib.validate.engine import validate

    if args.list_rules:
        return _list_rules(args.output)
    if args.filename is None:
        args.parser.error("the following arguments are required: FILE")

    report = validate(
        args.filename, policy=args.policy, disk_format=args.disk_format, fmt=args.format
    )
    if args.output == "json":
        print_json(report.to_json())
    else:
        sys.stdout.write(report.human())
    return 0 if report.ok else 1


def _list_rules(output: str) -> int:
    import textwrap

    from qcowlib.validate.registry import describe_rules

    rules = describe_rules()
    if output == "json":
        print_json([r.to_json() for r in rules])
        return 0
    width = max(len(r.name) for r in rules)
    for r in rules:
        formats = ", ".join(r.formats) if r.formats else "any format"
        sys.stdout.write(f"{r.name:<{width}}  {r.severity:<7}  {formats}\n")
        pad = " " * (width + 2)
        text = textwrap.fill(r.description, 100, initial_indent=pad, subsequent_indent=pad)
        sys.stdout.write(text + "\n")
    return 0
