"""``qcowlib snapshot``: internal snapshots, as ``qemu-img snapshot`` (-l, -c, -a, -d)."""

from __future__ import annotations

import argparse
import sys

from qcowlib.cli import INPUT_FORMATS
from qcowlib.cli.helptext import examples


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``snapshot`` subcommand."""
    p = sub.add_parser(
        "snapshot",
        help="list, create, apply or delete internal snapshots",
        description="Manage a qcow2 image's internal snapshots in place, as qemu-img snapshot.",
        epilog=examples(
            ("qcowlib snapshot -c before-upgrade disk.qcow2", "save the disk as it is now"),
            ("qcowlib snapshot -l disk.qcow2", "the snapshot table, as qemu-img prints it"),
        ),
    )
    p.add_argument(
        "-f", dest="format", choices=INPUT_FORMATS, help="image format (probed if not given)"
    )
    action = p.add_mutually_exclusive_group()
    action.add_argument(
        "-l", dest="list", action="store_true", help="list the snapshots (as qemu-img)"
    )
    action.add_argument("-c", dest="create", metavar="NAME", help="create a snapshot named NAME")
    action.add_argument(
        "-a", dest="apply", metavar="NAME", help="revert the disk to snapshot NAME (ID or name)"
    )
    action.add_argument("-d", dest="delete", metavar="NAME", help="delete the snapshot NAME")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing but errors")
    p.add_argument("filename", help="the image")
    p.set_defaults(func=_cmd_snapshot)


def _cmd_snapshot(args: argparse.Namespace) -> int:
    from qcowlib.ops import snapshot as ops

    if args.create is not None:
        ops.create_snapshot(args.filename, args.create, args.format)
    elif args.apply is not None:
        ops.apply_snapshot(args.filename, args.apply, args.format)
    elif args.delete is not None:
        ops.delete_snapshot(args.filename, args.delete, args.format)
    elif args.list:
        from qcowlib.cli.render import snapshot_lines

        snaps = ops.list_snapshots(args.filename, args.format)
        if snaps:
            lines = snapshot_lines([s.as_json() for s in snaps])
            sys.stdout.write("\n".join(lines) + "\n")
    return 0
