"""``check``: consistency check and repair of images, as ``qemu-img check`` does it.

This is the format-neutral front: it opens the file (read-write and locked as QEMU
locks it when repairing), probes the format, opens what qemu-img opens too (the backing
chain, an external data file) and hands the image to its format's checker; the qcow2
checker is :func:`qcowlib.formats.qcow2.checkfile.check_file`.  The result is a
:class:`~qcowlib.checkreport.CheckReport`.

Where qcowlib deliberately differs from qemu-img 7.2:

* qcow2, vmdk, vdi and vhdx are checked (each format's ``check`` module says how it
  follows QEMU). Encrypted images are checked without their key (the check never
  decrypts). A VHDX log that needs replaying is replayed by ``-r`` (as QEMU replays it
  when it opens the image read-write); hostile logs are refused before any write.
* Repair punches holes where the leaked clusters it frees were, as QEMU's discard does,
  but only when the image has no other error (QEMU discards them even when they only
  look leaked because a broken table could not be followed).  It does not touch
  persistent bitmaps (QEMU re-stores them whenever it opens an image read-write).
* Caps on hostile input: ``MAX_CHECK_CLUSTERS``, ``MAX_REPAIR_GROWTH`` (QEMU extends a
  file to any offset a corrupt refcount table names) and ``MAX_MESSAGES`` (the counts
  stay exact; the lines past it are dropped, and a last line says how many).
* After QEMU signals a fatal corruption while repairing, it marks the image corrupt and
  stops using it, so its second pass fails; qcowlib marks it too but carries on.
* The snapshot table is rewritten (``-r all``) only where its new clusters already have
  a refcount block; otherwise the problem stays reported.
* Messages for images that cannot be opened at all use qcowlib's wording.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Final

from qcowlib.checkreport import CheckNotSupported, CheckReport
from qcowlib.errors import InvalidArgument, UnsupportedFeature

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy
    from qcowlib.core.hostfile import HostFile

__all__ = ["CheckNotSupported", "CheckReport", "check"]

#: BdrvCheckMode bits for each ``repair`` value.
_MODES: Final = {None: 0, "leaks": 1, "all": 3}


def check(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    repair: str | None = None,
    *,
    backing_policy: BackingPolicy | str | None = None,
    force_share: bool = False,
) -> CheckReport:
    """Check an image's metadata for consistency, and optionally repair it.

    ``repair`` is None (only read; the file is opened read-only), ``"leaks"`` (free
    clusters that are allocated but unused) or ``"all"`` (also fix refcounts that are too
    low, rebuild the refcount structure when needed, and fix ``OFLAG_COPIED`` and
    misaligned preallocated zero clusters).  The format is probed unless ``fmt`` is given.
    A backing chain and an external data file must be openable, as for qemu-img, as
    ``backing_policy`` allows (``follow``, ``contained``, ``none``).  The image is
    locked as qemu-img locks it: :class:`~qcowlib.errors.ImageLocked` when another
    process has it open for writing, unless ``force_share`` (``-U``; never with a
    repair).

    Problems found *in* the image are counted in the report, not raised.  Raises
    :class:`CheckNotSupported` for formats without checks (raw: qemu-img exits 63),
    :class:`UnsupportedFeature` for formats qcowlib cannot check yet,
    :class:`InvalidArgument` for a bad ``fmt`` or ``repair``, and other
    :class:`QcowlibError` subclasses when the image cannot be opened at all (bad header,
    missing file, backing file or data file) or written while repairing.
    """
    import contextlib

    from qcowlib.core import interrupt
    from qcowlib.core.chain import as_policy
    from qcowlib.core.hostfile import HostFile
    from qcowlib.formats import registry
    from qcowlib.formats.opener import ChainOpener

    path = os.fspath(path)
    if repair not in _MODES:
        raise InvalidArgument(f"repair must be 'leaks' or 'all', not {repair!r}")
    fix = _MODES[repair]
    if fix and force_share:
        raise InvalidArgument("force_share (-U) cannot be used with a repair, which writes")
    policy = as_policy(backing_policy, force_share=force_share).rooted(path)
    if fmt is not None and fmt not in registry.known():
        raise InvalidArgument(f"unknown format {fmt!r}")
    host = HostFile(path, writable=bool(fix))
    try:
        _lock(host, path, fix, force_share)
        checker = _checker(host, path, fmt)
        # A repair writes in place: a signal waits until it is done (no temporary file).
        with interrupt.deferred() if fix else contextlib.nullcontext():
            report: CheckReport = checker(host, path, fix, ChainOpener(policy))
        return report
    finally:
        host.close()


def _lock(host: HostFile, path: str, fix: int, force_share: bool) -> None:
    """QEMU's locks: a repair writes, so a running VM's disk is never touched."""
    from qcowlib.core.locks import take_read_locks, take_write_locks

    if fix:
        take_write_locks(host.fd, path)
    else:
        take_read_locks(host.fd, path, force_share=force_share)


def _checker(host: HostFile, path: str, fmt: str | None) -> Any:
    """The format's check (probed unless ``fmt``), or why there is none."""
    from qcowlib.formats import registry
    from qcowlib.formats.opener import probe_format

    detected = fmt if fmt is not None else probe_format(host)
    entry = registry.by_name(detected)
    if entry.nothing_to_check:
        raise CheckNotSupported(f"{detected} images have nothing to check", file=path)
    if entry.check is None:
        raise UnsupportedFeature(f"checking {detected} images is not supported", file=path)
    return entry.implementation("check")
