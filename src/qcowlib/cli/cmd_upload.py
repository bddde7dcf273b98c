"""``upload``: validated, streamed, verified upload to Glance."""

from __future__ import annotations

import argparse
import sys

from qcowlib.cli import INPUT_FORMATS, Failed, add_output, print_json

GLANCE_DISK_FORMATS = (
    "raw",
    "qcow2",
    "vmdk",
    "vdi",
    "vhd",
    "vhdx",
    "iso",
    "ploop",
    "aki",
    "ari",
    "ami",
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("upload", help="upload an image to OpenStack Glance")
    p.add_argument("--os-cloud", dest="cloud", help="cloud name in clouds.yaml (or OS_CLOUD)")
    p.add_argument("--name", required=True)
    p.add_argument("--disk-format", choices=GLANCE_DISK_FORMATS)
    p.add_argument("--container-format", default="bare", choices=("bare",))
    p.add_argument("--flatten", action="store_true", help="send an overlay's whole chain")
    p.add_argument("--min-disk", type=int, metavar="GB")
    p.add_argument("--min-ram", type=int, metavar="MB")
    p.add_argument("--visibility", choices=("public", "private", "shared", "community"))
    p.add_argument("--protected", action="store_true")
    p.add_argument("--property", action="append", default=[], metavar="K=V")
    p.add_argument("--force", action="store_true", help="upload despite validation errors")
    p.add_argument(
        "--connect-timeout",
        type=float,
        metavar="SECONDS",
        help="wait at most this long to connect to Glance (default: clouds.yaml "
        "api_timeout, else 30)",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        metavar="SECONDS",
        help="wait at most this long for each answer from Glance, or for it to take more "
        "of the image (default: clouds.yaml api_timeout, else 120)",
    )
    p.add_argument("-f", dest="format", choices=INPUT_FORMATS)
    p.add_argument("-p", dest="progress", action="store_true")
    add_output(p)
    p.add_argument("filename")
    p.set_defaults(func=_cmd_upload)


def _cmd_upload(args: argparse.Namespace) -> int:
    import os

    from qcowlib.cli.progress import ProgressBar
    from qcowlib.glance.upload import UploadRequest, ValidationRefused, parse_properties, upload

    req = UploadRequest(
        path=args.filename,
        name=args.name,
        disk_format=args.disk_format,
        container_format=args.container_format,
        flatten=args.flatten,
        min_disk=args.min_disk,
        min_ram=args.min_ram,
        visibility=args.visibility,
        protected=args.protected,
        properties=dict(parse_properties(args.property)),
        force=args.force,
        src_format=args.format,
    )
    bar = ProgressBar() if args.progress else None
    try:
        result = upload(
            req,
            cloud=args.cloud or os.environ.get("OS_CLOUD"),
            progress=bar.update if bar else None,
            connect_timeout=args.connect_timeout,
            read_timeout=args.read_timeout,
        )
    except ValidationRefused as exc:
        reasons = "; ".join(f"[{f['rule']}] {f['message']}" for f in exc.findings)
        hint = "--force overrides"
        if any("backing" in f["rule"] for f in exc.findings):
            hint = "or upload with --flatten, which sends the whole chain as one image; " + hint
        raise Failed(f"upload refused, nothing was sent: {reasons} ({hint})") from None
    finally:
        if bar:
            bar.finish()
    if args.output == "json":
        print_json(result)
    else:
        sys.stdout.write(
            f"Uploaded {result['name']} ({result['id']}): {result['status']}, "
            f"{result['size']} bytes, checksum {result['checksum']}\n"
        )
    return 0
