"""``checksum``: digests of an image file as stored and, with ``--content``, of its disk.

Human output is one line per digest, ``md5sum``-like with the algorithm in front
(``content-`` marks a digest of the guest-visible disk), then the file size::

    md5     d41d8cd98f00b204e9800998ecf8427e  disk.qcow2
    sha512  cf83e1357eefb8bdf1542850d66d8007...  disk.qcow2
    size    0  disk.qcow2
"""

from __future__ import annotations

import argparse
import sys

from qcowlib.cli import INPUT_FORMATS, add_output, add_read_options, print_json
from qcowlib.cli.helptext import examples


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "checksum",
        help="digests of an image file (as Glance computes them) and of its disk content",
        description="Digest an image file as stored (what Glance records for an upload "
        "of it: checksum is md5, os_hash_value sha512) and, with --content, the disk it "
        "holds, which is the same for one disk in any format or chain.",
        epilog=examples(
            ("qcowlib checksum disk.qcow2", "md5 and sha512 of the file, and its size"),
            (
                "qcowlib checksum --content --algo sha256 overlay.qcow2",
                "sha256 of the file and of the guest-visible disk, through the chain",
            ),
        ),
    )
    p.add_argument(
        "-f",
        dest="format",
        choices=INPUT_FORMATS,
        metavar="FMT",
        help="the image's format for --content (default: probed)",
    )
    p.add_argument(
        "--algo",
        default="md5,sha512",
        metavar="LIST",
        help="comma-separated algorithms: md5, sha1, sha256, sha512, xxh3_64, xxh3_128 "
        "(default md5,sha512: Glance's checksum and os_hash_value)",
    )
    p.add_argument(
        "--content",
        action="store_true",
        help="also digest the guest-visible disk (all virtual-size bytes, through the "
        "backing chain), the same for one disk in any format",
    )
    add_output(p)
    add_read_options(p)
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    p.add_argument("filename", metavar="FILE", help="the image file")
    p.set_defaults(func=_cmd_checksum)


def _cmd_checksum(args: argparse.Namespace) -> int:
    from qcowlib.cli.progress import ProgressBar
    from qcowlib.ops.checksum import checksum

    algos = [a.strip() for a in args.algo.split(",") if a.strip()]
    bar = ProgressBar() if args.progress else None
    try:
        result = checksum(
            args.filename,
            algos,
            content=args.content,
            fmt=args.format,
            backing_policy=args.backing_policy,
            force_share=args.force_share,
            progress=bar.update if bar else None,
        )
    finally:
        if bar:
            bar.finish()
    if args.output == "json":
        print_json(result)
        return 0
    rows = [(algo, hexdigest) for algo, hexdigest in result["file"].items()]
    rows += [
        (f"content-{algo}", hexdigest) for algo, hexdigest in result.get("content", {}).items()
    ]
    rows.append(("size", str(result["size"])))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        sys.stdout.write(f"{label:<{width}}  {value}  {args.filename}\n")
    return 0
