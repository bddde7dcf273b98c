"""``resize``, ``rebase`` and ``commit``."""

from __future__ import annotations

import argparse
import sys

from qcowlib.cli import INPUT_FORMATS, add_read_options


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("resize", help="change the virtual size of an image")
    p.add_argument("-f", dest="format", choices=INPUT_FORMATS)
    p.add_argument("--shrink", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("filename")
    p.add_argument("size", help="SIZE, +SIZE or -SIZE")
    p.set_defaults(func=_cmd_resize)

    p = sub.add_parser("rebase", help="change the backing file of an image")
    p.add_argument("-u", dest="unsafe", action="store_true", help="only change the header")
    p.add_argument("-b", dest="backing", required=True)
    p.add_argument("-F", dest="backing_format", choices=INPUT_FORMATS)
    p.add_argument("-f", dest="format", choices=("qcow2",))
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    add_read_options(p, share=False)
    p.add_argument("filename")
    p.set_defaults(func=_cmd_rebase)

    p = sub.add_parser("commit", help="write an image's data into its backing file")
    p.add_argument("-d", dest="drop", action="store_true", help="keep the image's data")
    p.add_argument("-f", dest="format", choices=("qcow2",))
    p.add_argument("-p", dest="progress", action="store_true")
    p.add_argument("-q", dest="quiet", action="store_true")
    add_read_options(p, share=False)
    p.add_argument("filename")
    p.set_defaults(func=_cmd_commit)


def _cmd_resize(args: argparse.Namespace) -> int:
    from qcowlib.ops.modify import resize

    size: str = args.size
    resize(args.filename, size, fmt=args.format, shrink=args.shrink)
    if not args.quiet:
        sys.stdout.write("Image resized.\n")
    return 0


def _cmd_rebase(args: argparse.Namespace) -> int:
    from qcowlib.cli.progress import ProgressBar
    from qcowlib.ops.modify import rebase

    bar = ProgressBar() if args.progress else None
    try:
        rebase(
            args.filename,
            args.backing,
            args.backing_format,
            unsafe=args.unsafe,
            progress=bar.update if bar else None,
            backing_policy=args.backing_policy,
        )
    finally:
        if bar:
            bar.finish()
    return 0


def _cmd_commit(args: argparse.Namespace) -> int:
    from qcowlib.cli.progress import ProgressBar
    from qcowlib.ops.modify import commit

    bar = ProgressBar() if args.progress else None
    try:
        commit(
            args.filename,
            drop=args.drop,
            progress=bar.update if bar else None,
            backing_policy=args.backing_policy,
        )
    finally:
        if bar:
            bar.finish()
    if not args.quiet:
        sys.stdout.write("Image committed.\n")
    return 0
