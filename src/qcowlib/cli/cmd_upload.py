"""``upload``: validated, streamed, verified upload to Glance (``openstack image create``).

The cloud options are openstacksdk's own (``--os-cloud``, ``--os-auth-url``, ... with
their ``OS_*`` defaults), registered through ``openstack.config`` when the ``upload``
parser first parses, so that no other command imports openstacksdk.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qcowlib.cli import INPUT_FORMATS, Failed, _Parser, add_output, add_read_options, print_json
from qcowlib.cli.helptext import examples

if TYPE_CHECKING:
    from qcowlib.glance.request import UploadRequest, UploadResult

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
#: Glance's default container formats (glance/glance.api: ``container_formats``).
GLANCE_CONTAINER_FORMATS = ("bare", "ovf", "ova", "aki", "ari", "ami", "docker", "compressed")


class _CloudParser(_Parser):
    """The ``upload`` parser: adds openstacksdk's cloud options on its first parse.

    openstacksdk chooses which auth plugin's options to offer from the arguments
    themselves (``--os-cloud``, ``--os-auth-type``), so they are registered when the
    arguments are known; ``upload --help`` lists them all.
    """

    _cloud_ready = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if not self._cloud_ready:
            self._cloud_ready = True
            argv = list(sys.argv[1:] if args is None else args)
            self._add_cloud_options(argv)  # may rewrite --os_x to --os-x, as openstack does
            args = argv
        return super().parse_known_args(args, namespace)

    def _add_cloud_options(self, argv: list[str]) -> None:
        from qcowlib.glance.cloud import CloudConfigError, register_arguments

        try:
            import openstack  # noqa: F401
        except ImportError:  # reported when the upload gets that far
            self.set_defaults(cloud_setup=None)
            return
        try:
            setup = register_arguments(self, argv)
        except CloudConfigError as exc:
            if "-h" not in argv and "--help" not in argv:
                self.exit(1, f"qcowlib: error: {exc}\n")
            # --help still works with a broken configuration (and says what is wrong)
            self.epilog = f"The cloud configuration has a problem: {exc}"
            setup = None
        self.set_defaults(cloud_setup=setup)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    default_class = sub._parser_class
    sub._parser_class = _CloudParser
    try:
        p = sub.add_parser(
            "upload",
            help="upload an image to OpenStack Glance",
            description="Validate, stream and verify an upload to Glance "
            "(openstack image create). Cloud options are openstacksdk's: --os-cloud or "
            "OS_CLOUD with clouds.yaml, or the OS_* variables and --os-* options.",
            # openstacksdk's --os-cloud replaces the stand-in below when it is registered
            conflict_handler="resolve",
            epilog=examples(
                (
                    "qcowlib upload --os-cloud mycloud --name centos --flatten overlay.qcow2",
                    "the whole chain as one standalone qcow2, streamed (no temporary file)",
                ),
                (
                    "qcowlib upload --os-cloud mycloud --name web --disk-format raw "
                    "--property os_distro=ubuntu --private disk.raw",
                    "a raw image with a property, visible to its project only",
                ),
            ),
        )
    finally:
        sub._parser_class = default_class
    _add_image_options(p)
    _add_transfer_options(p)
    p.add_argument("-f", dest="format", choices=INPUT_FORMATS, help="the file's format")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    add_output(p)
    add_read_options(p)
    p.add_argument("filename", help="the image file")
    p.set_defaults(func=_cmd_upload, cloud_setup=None)


def _add_transfer_options(p: argparse.ArgumentParser) -> None:
    """How the bytes go: direct upload or import, the store, --force, the timeouts."""
    p.add_argument(
        "--import",
        dest="use_import",
        action="store_true",
        help="use interoperable image import (stage, then glance-direct) instead of "
        "a direct upload",
    )
    p.add_argument(
        "--store",
        metavar="ID",
        help="store the image in this store of a multi-store Glance (with --import: "
        "the store to import into)",
    )
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


def _add_image_options(p: argparse.ArgumentParser) -> None:
    """The image record's options, as ``openstack image create`` spells them."""
    # A stand-in, for the parser built without arguments (the reference, `qcowlib
    # --help`) and without openstacksdk; the first parse registers openstacksdk's own.
    p.add_argument(
        "--os-cloud", metavar="NAME", help="cloud name in clouds.yaml (default: OS_CLOUD)"
    )
    p.add_argument("--name", required=True, help="the image's name in Glance")
    p.add_argument(
        "--disk-format",
        choices=GLANCE_DISK_FORMATS,
        help="Glance disk_format (default: detected from the content; qcow2 with --flatten)",
    )
    p.add_argument(
        "--container-format",
        default="bare",
        choices=GLANCE_CONTAINER_FORMATS,
        help="Glance container_format (default bare; Glance inspects the data only for bare, "
        "and any other needs --disk-format)",
    )
    p.add_argument("--flatten", action="store_true", help="send an overlay's whole chain")
    p.add_argument(
        "--min-disk", type=int, metavar="GB", help="minimum disk (default: virtual size in GiB)"
    )
    p.add_argument("--min-ram", type=int, metavar="MB", help="minimum RAM to boot the image")
    vis = p.add_mutually_exclusive_group()
    vis.add_argument(
        "--visibility",
        choices=("public", "private", "shared", "community"),
        help="who can see the image (Glance's default: shared)",
    )
    for value in ("public", "private", "shared", "community"):
        vis.add_argument(
            f"--{value}",
            dest="visibility",
            action="store_const",
            const=value,
            help=f"same as --visibility {value}",
        )
    p.add_argument("--protected", action="store_true", help="protect the image from deletion")
    p.add_argument(
        "--property",
        action="append",
        default=[],
        metavar="K=V",
        help="set an image property (repeatable)",
    )
    p.add_argument(
        "--tag", action="append", default=[], metavar="TAG", help="add a tag (repeatable)"
    )


def _cmd_upload(args: argparse.Namespace) -> int:
    from qcowlib.cli.cmd_flatten import ChainReport
    from qcowlib.cli.progress import ProgressBar
    from qcowlib.glance.cloud import connect
    from qcowlib.glance.request import ValidationRefused
    from qcowlib.glance.upload import upload

    req = _request(args)
    bar = ProgressBar() if args.progress else None
    report = ChainReport(args)

    def connection() -> Any:
        return connect(args.cloud_setup, args, cloud=None if args.cloud_setup else args.os_cloud)

    try:
        result = upload(
            req,
            connect=connection,
            progress=bar.update if bar else None,
            on_chain=report,
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
    report.finish()
    _print_result(args, result)
    return 0


def _request(args: argparse.Namespace) -> UploadRequest:
    from qcowlib.glance.request import UploadRequest, parse_properties

    return UploadRequest(
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
        tags=list(args.tag),
        use_import=args.use_import,
        store=args.store,
        backing_policy=args.backing_policy,
        force_share=args.force_share,
    )


def _print_result(args: argparse.Namespace, result: UploadResult) -> None:
    if args.output == "json":
        print_json(result)
    else:
        how = " (imported)" if args.use_import else ""
        where = f" in store {','.join(result['stores'])}" if result["stores"] else ""
        sys.stdout.write(
            f"Uploaded {result['name']} ({result['id']}){how}: {result['status']}, "
            f"{result['size']} bytes{where}, checksum {result['checksum']}\n"
        )
