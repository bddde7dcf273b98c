"""``info``, ``map``, ``compare`` and ``convert``: the qemu-img commands whose parsers
are built one at a time (a run of ``info`` builds only ``info``'s parser)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Final

from qcowlib.cli import (
    INPUT_FORMATS,
    MAX_COROUTINES,
    Failed,
    _Parser,
    add_format_options,
    add_input_format,
    add_output,
    add_read_options,
    check_cache,
    parse_options,
    print_json,
    wants_option_help,
)
from qcowlib.cli.helptext import examples
from qcowlib.errors import QcowlibError


def _cmd_info(args: argparse.Namespace) -> int:
    from qcowlib.cli.render import human_info
    from qcowlib.ops.info import info

    result = info(
        args.filename,
        args.format,
        backing_chain=args.backing_chain,
        backing_policy=args.backing_policy,
        force_share=args.force_share,
    )
    if args.output == "json":
        print_json(result)
    elif isinstance(result, list):
        sys.stdout.write("\n".join(human_info(r) for r in result))
    else:
        sys.stdout.write(human_info(result))
    return 0


def _cmd_map(args: argparse.Namespace) -> int:
    from qcowlib.cli.render import write_human_map, write_map_json
    from qcowlib.formats.opener import open_disk
    from qcowlib.ops.map import map_entries

    start = _map_size(args.start_offset, "start offset")
    length = _map_size(args.max_length, "max length")
    with open_disk(
        args.filename, args.format, args.backing_policy, force_share=args.force_share
    ) as disk:
        entries = map_entries(disk, start or 0, length)  # streamed, as qemu-img prints
        if args.output == "json":
            write_map_json(entries, sys.stdout.write)
            return 0
        error = write_human_map(entries, sys.stdout.write)
    if error:
        raise Failed(error)
    return 0


def _map_size(text: str | None, what: str) -> int | None:
    """``--start-offset``/``--max-length``: a SIZE, refused as qemu-img refuses it."""
    if text is None:
        return None
    from qcowlib._units import parse_size

    try:
        value = parse_size(text)
    except QcowlibError:
        value = -1
    if value < 0:
        raise Failed(
            f"Invalid {what} specified. You may use k, M, G, T, P or E suffixes for "
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        )
    return value


def _cmd_compare(args: argparse.Namespace) -> int:
    from qcowlib.cli.progress import ProgressBar
    from qcowlib.formats.opener import open_disk
    from qcowlib.ops.compare import compare

    policy, share = args.backing_policy, args.force_share
    try:
        check_cache(args.src_cache, "source cache")
    except Failed as exc:
        raise Failed(str(exc), 2) from None

    try:
        with (
            open_disk(args.filename1, args.format1, policy, force_share=share) as a,
            open_disk(args.filename2, args.format2, policy, force_share=share) as b,
        ):
            bar = ProgressBar() if args.progress and not args.quiet else None
            try:
                result = compare(a, b, strict=args.strict, progress=bar.update if bar else None)
            finally:
                if bar:
                    bar.finish()
    except QcowlibError as exc:
        raise Failed(str(exc), 2) from None
    if not args.quiet:
        for line in result.messages:
            sys.stdout.write(line + "\n")
    return 0 if result.identical else 1


def _cmd_convert(args: argparse.Namespace) -> int:
    from qcowlib._units import parse_size
    from qcowlib.cli.progress import ProgressBar
    from qcowlib.ops.convert import convert, convert_into

    check_cache(args.cache)
    check_cache(args.src_cache, "source cache")
    if args.coroutines is not None and not 1 <= args.coroutines <= MAX_COROUTINES:
        raise Failed(
            "Invalid number of coroutines. Allowed number of coroutines is between 1 and "
            f"{MAX_COROUTINES}"
        )
    if args.target_is_zero and not args.no_create:
        raise Failed("--target-is-zero requires use of -n flag")
    options = parse_options(",".join(args.options))  # -o may repeat, as in qemu-img
    if wants_option_help(options, args.out_format or "raw"):
        return 0
    sparse = parse_size(args.sparse_size) if args.sparse_size is not None else 4096
    bar = ProgressBar() if args.progress and not args.quiet else None
    try:
        if args.no_create:
            if options or args.backing or args.compress:
                raise Failed("-n writes into an existing image: -o, -B and -c do not apply")
            convert_into(
                args.src,
                args.dst,
                args.out_format,
                src_format=args.format,
                target_is_zero=args.target_is_zero,
                sparse_size=sparse,
                progress=bar.update if bar else None,
            )
            return 0
        convert(
            args.src,
            args.dst,
            args.out_format or "raw",
            src_format=args.format,
            compress=args.compress,
            options=options,
            backing=args.backing,
            backing_format=args.backing_format,
            sparse_size=sparse,
            progress=bar.update if bar else None,
            backing_policy=args.backing_policy,
            force_share=args.force_share,
        )
    finally:
        if bar:
            bar.finish()
    return 0


def register_one(sub: argparse._SubParsersAction[_Parser], name: str) -> None:
    """The commands this module implements itself."""
    register = _REGISTER.get(name)
    if register is not None:
        register(sub)


def _register_info(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "info",
        help="show image information",
        description="Show an image's format, sizes, backing file and format-specific "
        "details, as qemu-img info.",
        epilog=examples(
            ("qcowlib info disk.qcow2", "format, virtual and file size, cluster size"),
            (
                "qcowlib info --backing-chain --output json overlay.qcow2",
                "the overlay and every image under it, as qemu-img's JSON (a list)",
            ),
        ),
    )
    add_input_format(p)
    add_output(p)
    p.add_argument(
        "--backing-chain",
        action="store_true",
        help="also show every backing file, top image first (they are opened)",
    )
    add_read_options(p)
    p.add_argument("filename", metavar="FILE", help="the image file")
    p.set_defaults(func=_cmd_info)


def _register_map(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "map",
        help="show the allocation map",
        description="Show which ranges of the disk hold data, zeros or nothing, and "
        "in which image of the chain, as qemu-img map.",
        epilog=examples(
            ("qcowlib map overlay.qcow2", "the data ranges, with host offsets and files"),
            (
                "qcowlib map --output json overlay.qcow2",
                "every run with its depth in the chain, as qemu-img map's JSON",
            ),
        ),
    )
    add_input_format(p)
    add_output(p)
    p.add_argument("--start-offset", metavar="N", help="map from guest offset N (SIZE; default 0)")
    p.add_argument(
        "--max-length", metavar="N", help="map at most N bytes (SIZE; default: to the end)"
    )
    add_read_options(p)
    p.add_argument("filename", metavar="FILE", help="the image file")
    p.set_defaults(func=_cmd_map)


def _register_compare(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "compare",
        help="compare guest content of two images",
        description="Compare what a guest sees in two images, whatever their formats. "
        "Exit status 0: identical, 1: different, 2: error.",
        epilog=examples(
            (
                "qcowlib compare disk.qcow2 disk.raw",
                "one disk in two formats: Images are identical.",
            ),
            ("qcowlib compare overlay.qcow2 disk.qcow2", "the first mismatch (exit 1)"),
        ),
    )
    add_input_format(p, "-f", "format1")
    p.add_argument(
        "-F",
        dest="format2",
        choices=INPUT_FORMATS,
        metavar="FMT",
        help="the second image's format (default: probed)",
    )
    p.add_argument(
        "-s",
        dest="strict",
        action="store_true",
        help="strict mode: images of different sizes or block status differ",
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing but errors")
    p.add_argument(
        "-T", dest="src_cache", metavar="CACHE", help="cache mode (accepted, as qemu-img's)"
    )
    add_read_options(p)
    p.add_argument("filename1", metavar="A", help="the first image")
    p.add_argument("filename2", metavar="B", help="the second image")
    p.set_defaults(func=_cmd_compare)


def _register_convert(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an image to another format",
        description="Copy an image's guest content (its whole backing chain) into a new "
        "image of any writable format, as qemu-img convert.",
        epilog=examples(
            (
                "qcowlib convert -c -O qcow2 overlay.qcow2 small.qcow2",
                "a standalone, compressed qcow2",
            ),
            (
                "qcowlib convert -O vmdk -o subformat=streamOptimized disk.qcow2 disk.vmdk",
                "a VMDK for VMware ESXi",
            ),
        ),
    )
    add_input_format(p)
    p.add_argument(
        "-O",
        dest="out_format",
        choices=INPUT_FORMATS,
        metavar="FMT",
        help="the output format (default raw; with -n: the target's, probed)",
    )
    add_format_options(p)
    p.add_argument("-c", dest="compress", action="store_true", help="compress the output's data")
    p.add_argument(
        "-B",
        dest="backing",
        metavar="BACKING",
        help="write an overlay over BACKING holding only what differs from it",
    )
    p.add_argument(
        "-F",
        dest="backing_format",
        metavar="FMT",
        help="the format of BACKING (-B); never guessed",
    )
    p.add_argument(
        "-S",
        dest="sparse_size",
        metavar="SIZE",
        help="all-zero blocks of SIZE bytes are left unallocated (default 4k; "
        "0: no zero detection)",
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    _convert_flags(p)
    add_read_options(p)
    p.add_argument("src", metavar="SRC", help="the source image")
    p.add_argument("dst", metavar="DST", help="the new image")
    p.set_defaults(func=_cmd_convert)


_REGISTER: Final[dict[str, Callable[[argparse._SubParsersAction[_Parser]], None]]] = {
    "info": _register_info,
    "map": _register_map,
    "compare": _register_compare,
    "convert": _register_convert,
}


def _convert_flags(p: argparse.ArgumentParser) -> None:
    """convert's qemu-img options beyond the basic ones."""
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing but errors")
    p.add_argument(
        "-n",
        dest="no_create",
        action="store_true",
        help="do not create DST: write into the existing image (at least as large as SRC)",
    )
    p.add_argument(
        "--target-is-zero",
        action="store_true",
        help="with -n: the target already reads as zeros, so zero ranges are not written",
    )
    p.add_argument(
        "-W",
        dest="out_of_order",
        action="store_true",
        help="allow out-of-order writes (accepted; qcowlib writes in file order)",
    )
    p.add_argument(
        "-m",
        dest="coroutines",
        type=int,
        metavar="N",
        help=f"parallel requests, 1..{MAX_COROUTINES} (accepted; qcowlib sizes its own pool)",
    )
    p.add_argument(
        "-t",
        dest="cache",
        metavar="CACHE",
        help="output cache mode: none, writeback, writethrough, directsync, unsafe "
        "(accepted; outputs are always flushed before they appear)",
    )
    p.add_argument(
        "-T", dest="src_cache", metavar="CACHE", help="source cache mode (accepted, as -t)"
    )
