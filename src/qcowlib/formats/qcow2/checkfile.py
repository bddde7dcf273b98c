"""The registry's qcow2 checker: the header as ``qemu-img check`` reads it, the files
it opens too, then the check itself.

A read-only check of a small, plain image is answered without numpy where the plain
pass (:mod:`~qcowlib.formats.qcow2.check_small`) proves it consistent; every other
check, and every repair, is :func:`~qcowlib.formats.qcow2.check.check_image`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qcowlib.formats.qcow2.check_small import small_check
from qcowlib.formats.qcow2.hostio import read_header

if TYPE_CHECKING:
    from collections.abc import Callable

    from qcowlib.checkreport import CheckReport
    from qcowlib.core.disk import Disk
    from qcowlib.core.hostfile import HostFile
    from qcowlib.formats.qcow2 import header as hdr

__all__ = ["check_file"]


def check_file(
    host: HostFile, path: str, fix: int, open_backing: Callable[[str, str | None], Disk]
) -> CheckReport:
    """The registry's qcow2 checker: read the header as ``qemu-img check`` does, make
    sure the backing chain (through ``open_backing``) and an external data file open, as
    qemu-img opens them too, then check the image (the plain pass where it answers, the
    full check otherwise)."""
    header = read_header(host, for_check=True)
    _open_linked_files(path, header, open_backing)
    if not fix:
        report = small_check(host, header, path)
        if report is not None:
            return report
    from qcowlib.formats.qcow2.check import check_image

    return check_image(host, header, path, fix)


def _open_linked_files(
    path: str, h: hdr.Header, open_backing: Callable[[str, str | None], Disk]
) -> None:
    """qemu-img opens the backing chain and the data file too; fail as it would.

    ``open_backing`` may carry the caller's backing policy as ``.policy``
    (:class:`qcowlib.formats.opener.ChainOpener`); the data file and the backing file
    go through it.
    """
    from qcowlib.core.chain import BackingPolicy, open_linked, resolve_linked_path
    from qcowlib.errors import BackingFormatUnknown, BackingNotFound, QcowlibIOError

    policy = getattr(open_backing, "policy", None)
    if not isinstance(policy, BackingPolicy):
        policy = BackingPolicy()
    policy = policy.rooted(path)
    if h.has_data_file and h.data_file is not None:
        host, _ = open_linked(path, h.data_file, "external data file", policy)
        host.close()
    if h.backing_file is not None and policy.follow:
        name = resolve_linked_path(path, h.backing_file, "backing file", policy)
        if h.backing_format is None and not policy.probe_format:
            raise BackingFormatUnknown(
                f"backing file {h.backing_file!r} has no recorded format, and backing "
                f"policy {policy.name!r} never probes one",
                file=path,
            )
        try:
            open_backing(name, h.backing_format).close()
        except QcowlibIOError as exc:
            raise BackingNotFound(
                f"cannot open backing file {name!r}: {exc.message}", file=path
            ) from None
