"""``resize``, ``rebase`` and ``commit``."""

from __future__ import annotations

import argparse
import sys

from qcowlib.cli import INPUT_FORMATS, add_input_format, add_read_options
from qcowlib.cli.helptext import examples


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_resize(sub)
    _register_rebase(sub)
    _register_commit(sub)


def _register_resize(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "resize",
        help="change the virtual size of an image",
        description="Grow or shrink the disk an image holds (in place), as qemu-img resize.",
        epilog=examples(
            ("qcowlib resize disk.qcow2 +10M", "grow the disk by 10 MiB"),
            ("qcowlib resize --shrink disk.raw 512k", "cut the disk to 512 KiB"),
        ),
    )
    add_input_format(p)
    p.add_argument(
        "--shrink",
        action="store_true",
        help="allow a smaller size (the data past it is lost)",
    )
    p.add_argument("-q", dest="quiet", action="store_true", help="do not print 'Image resized.'")
    p.add_argument("filename", metavar="FILE", help="the image to resize")
    p.add_argument(
        "size", metavar="SIZE", help="the new size, or +SIZE / -SIZE relative to the current"
    )
    p.set_defaults(func=_cmd_resize)


def _register_rebase(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "rebase",
        help="change the backing file of an image",
        description="Make an overlay use another backing file, copying into it what "
        "differs so that the guest sees the same disk, as qemu-img rebase.",
        epilog=examples(
            (
                "qcowlib rebase -b disk.qcow2 -F qcow2 overlay.qcow2",
                "overlay.qcow2 over disk.qcow2 instead, same content",
            ),
            ('qcowlib rebase -b "" overlay.qcow2', "no backing file any more: its data copied in"),
        ),
    )
    p.add_argument(
        "-u",
        dest="unsafe",
        action="store_true",
        help="only change the name in the header (no data is compared or copied)",
    )
    p.add_argument(
        "-b",
        dest="backing",
        required=True,
        metavar="BACKING",
        help='the new backing file ("": none, the data is copied into the image)',
    )
    p.add_argument(
        "-F",
        dest="backing_format",
        choices=INPUT_FORMATS,
        metavar="FMT",
        help="the format of the new backing file",
    )
    p.add_argument(
        "-f",
        dest="format",
        choices=("qcow2",),
        metavar="FMT",
        help="the image's format (qcow2)",
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing but errors")
    _cache_flags(p, source=True)
    add_read_options(p, share=False)
    p.add_argument("filename", metavar="FILE", help="the overlay to rebase")
    p.set_defaults(func=_cmd_rebase)


def _register_commit(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "commit",
        help="write an image's data into its backing file",
        description="Write what an overlay holds into its backing file, and empty the "
        "overlay (unless -d), as qemu-img commit.",
        epilog=examples(
            ("qcowlib commit overlay.qcow2", "base.qcow2 now holds the overlay's changes"),
        ),
    )
    p.add_argument(
        "-d",
        dest="drop",
        action="store_true",
        help="keep the image's data (do not empty it after the commit)",
    )
    p.add_argument(
        "-f",
        dest="format",
        choices=("qcow2",),
        metavar="FMT",
        help="the image's format (qcow2)",
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    p.add_argument("-q", dest="quiet", action="store_true", help="do not print 'Image committed.'")
    _cache_flags(p, source=False)
    add_read_options(p, share=False)
    p.add_argument("filename", metavar="FILE", help="the overlay to commit")
    p.set_defaults(func=_cmd_commit)


def _cache_flags(p: argparse.ArgumentParser, *, source: bool) -> None:
    """qemu-img's ``-t`` (and ``-T``) cache modes: accepted, checked, documented."""
    p.add_argument("-t", dest="cache", metavar="CACHE", help="cache mode (accepted, as qemu-img's)")
    if source:
        p.add_argument("-T", dest="src_cache", metavar="CACHE", help="source cache mode (accepted)")


def _check_caches(args: argparse.Namespace) -> None:
    from qcowlib.cli import check_cache

    check_cache(args.cache)
    check_cache(getattr(args, "src_cache", None), "source cache")


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

    _check_caches(args)
    bar = ProgressBar() if args.progress and not args.quiet else None
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

    _check_caches(args)
    bar = ProgressBar() if args.progress and not args.quiet else None
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
