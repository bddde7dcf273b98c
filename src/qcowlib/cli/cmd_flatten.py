"""``flatten``: a backing chain as one standalone image (DST ``-`` is stdout)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qcowlib.cli import (
    add_format_options,
    add_input_format,
    add_read_options,
    parse_options,
    wants_option_help,
)
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
    add_format_options(p)
    p.add_argument("-c", dest="compress", action="store_true", help="compress the output's data")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing but errors")
    add_read_options(p)
    p.add_argument("src", metavar="SRC", help="the top image of the chain")
    p.add_argument("dst", metavar="DST", help="the new image, or - for stdout")
    p.set_defaults(func=_cmd_flatten)


class ChainReport:
    """What flatten and ``upload --flatten`` say about the chain they read, on stderr.

    Nothing with ``-q``.  With ``-p`` or ``--debug``, as soon as the chain is open (so
    a long run shows what it reads; ``--debug`` lists every image).  Otherwise once the
    command has succeeded, and only when there is a backing file: a failure stays the
    contract's one ``qcowlib: error:`` line.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.quiet = bool(getattr(args, "quiet", False))
        self.early = bool(args.progress or args.debug)
        self.every = bool(args.debug)
        self.chain: Sequence[tuple[str, str]] = ()

    def __call__(self, chain: Sequence[tuple[str, str]]) -> None:
        self.chain = chain
        if self.early and not self.quiet:
            self._print()

    def finish(self) -> None:
        """The command succeeded: report the chain unless that was done already."""
        if not self.early and not self.quiet and len(self.chain) > 1:
            self._print()

    def _print(self) -> None:
        from qcowlib.cli.render import describe_chain

        sys.stderr.write(describe_chain(self.chain, every=self.every))
        sys.stderr.flush()


def _cmd_flatten(args: argparse.Namespace) -> int:
    from qcowlib.cli.progress import ProgressBar
    from qcowlib.ops.flatten import flatten

    options = parse_options(",".join(args.options))  # -o may repeat, as in qemu-img
    if wants_option_help(options, args.out_format):
        return 0
    bar = ProgressBar() if args.progress and not args.quiet else None
    report = ChainReport(args)
    try:
        flatten(
            args.src,
            args.dst,
            args.out_format,
            src_format=args.format,
            options=options,
            compress=args.compress,
            progress=bar.update if bar else None,
            backing_policy=args.backing_policy,
            force_share=args.force_share,
            on_chain=report,
        )
    finally:
        if bar:
            bar.finish()
    report.finish()
    return 0
