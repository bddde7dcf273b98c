"""``flatten``: a backing chain as one standalone image (DST ``-`` is stdout)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from qcowlib.cli import INPUT_FORMATS, add_read_options, parse_options, wants_option_help
from qcowlib.formats import registry


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("flatten", help="write a backing chain as one standalone image")
    p.add_argument("-f", dest="format", choices=INPUT_FORMATS)
    p.add_argument("-O", dest="out_format", default="qcow2", choices=registry.flattenable())
    p.add_argument("-o", dest="options")
    p.add_argument("-c", dest="compress", action="store_true")
    p.add_argument("-p", dest="progress", action="store_true")
    add_read_options(p)
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=_cmd_flatten)


def chain_reporter(args: argparse.Namespace) -> Callable[[Sequence[tuple[str, str]]], None]:
    """What flatten and ``upload --flatten`` say about the chain they read, on stderr:
    nothing with ``-q``; with ``-p`` or ``--debug`` always, otherwise only when there is
    a backing file (a lone image needs no mention); ``--debug`` lists every image."""

    def report(chain: Sequence[tuple[str, str]]) -> None:
        from qcowlib.cli.render import describe_chain

        if getattr(args, "quiet", False):
            return
        if len(chain) > 1 or args.progress or args.debug:
            sys.stderr.write(describe_chain(chain, every=args.debug))
            sys.stderr.flush()

    return report


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
            backing_policy=args.backing_policy,
            force_share=args.force_share,
            on_chain=chain_reporter(args),
        )
    finally:
        if bar:
            bar.finish()
    return 0
