"""``upload``: validated, streamed, verified upload to Glance."""

from __future__ import annotations

import argparse
import sys

from qcowlib.cli import Failed, add_input_format, add_output, print_json
from qcowlib.cli.helptext import examples

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
    p = sub.add_parser(
        "upload",
        help="upload an image to OpenStack Glance",
        description="Validate an image, stream it to Glance (openstacksdk, the 'glance' "
        "extra) and check that Glance's checksum and os_hash_value equal the digests "
        "computed while sending.  Exit status 0 only when the image is active and they "
        "match; a failed upload deletes the Glance image it created.",
        epilog=examples(
            (
                "qcowlib upload --os-cloud mycloud --name centos --flatten overlay.qcow2",
                "the whole chain as one standalone qcow2, streamed (no temporary file)",
            ),
            (
                "qcowlib upload --os-cloud mycloud --name web --disk-format raw "
                "--property os_distro=ubuntu --visibility private disk.raw",
                "a raw image with a property, visible to its project only",
            ),
        ),
    )
    p.add_argument(
        "--os-cloud",
        dest="cloud",
        metavar="NAME",
        help="cloud name in clouds.yaml (default: $OS_CLOUD)",
    )
    p.add_argument("--name", required=True, help="the Glance image name")
    p.add_argument(
        "--disk-format",
        choices=GLANCE_DISK_FORMATS,
        metavar="FMT",
        help="Glance disk_format (default: the detected format): " + ", ".join(GLANCE_DISK_FORMATS),
    )
    p.add_argument(
        "--container-format",
        default="bare",
        choices=("bare",),
        help="Glance container_format (bare)",
    )
    p.add_argument("--flatten", action="store_true", help="send an overlay's whole chain")
    p.add_argument("--min-disk", type=int, metavar="GB", help="disk size a flavor needs to boot it")
    p.add_argument("--min-ram", type=int, metavar="MB", help="memory a flavor needs to boot it")
    p.add_argument(
        "--visibility",
        choices=("public", "private", "shared", "community"),
        help="who may see the image (default: Glance's, shared)",
    )
    p.add_argument(
        "--protected", action="store_true", help="the image cannot be deleted until unset"
    )
    p.add_argument(
        "--property",
        action="append",
        default=[],
        metavar="K=V",
        help="an image property (may repeat), e.g. hw_disk_bus=scsi",
    )
    p.add_argument("--force", action="store_true", help="upload despite validation errors")
    add_input_format(p)
    p.add_argument("-p", dest="progress", action="store_true", help="show progress on stderr")
    add_output(p)
    p.add_argument("filename", metavar="FILE", help="the image to upload")
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
