"""qcowlib: read, convert and check virtual disk images, interoperable with qemu-img.

``import qcowlib`` stays light: numpy, construct and the rest load on first use.  Every
public name is listed in ``__all__`` (and by ``dir(qcowlib)`` and ``help(qcowlib)``);
paths are ``str`` or ``os.PathLike``; every error raised on purpose derives from
:class:`QcowlibError`.  Documentation: README.md and docs/ in the source tree.

>>> import qcowlib
>>> with qcowlib.open("overlay.qcow2") as disk:          # doctest: +SKIP
...     data = disk.read(0, 512)
"""

# No ``from __future__ import annotations`` here: it imports a module (a path search
# that a Ctrl-C during start-up can interrupt with a traceback), and this file's first
# statements must run before any import when qcowlib runs as the command (see below).
# Annotations naming TYPE_CHECKING-only classes are quoted instead.
import os as _os
import sys as _sys


def _stop_at_start(signum: int, frame: object) -> None:
    """SIGINT, SIGTERM or SIGHUP while the command starts: nothing is written yet and
    nothing could catch an exception, so end at once with ``128 + N`` and one line."""
    name = {2: "SIGINT", 15: "SIGTERM", 1: "SIGHUP"}.get(signum, f"signal {signum}")
    _os.write(2, f"qcowlib: error: interrupted by {name}\n".encode())
    _os._exit(128 + signum)


def _runs_as_program() -> bool:
    """Whether this process is the ``qcowlib`` command (``python -m qcowlib`` while the
    package is being located, or the console script), not a program importing us."""
    argv0 = _sys.argv[0] if _sys.argv else ""
    if argv0 == "-m":
        orig = list(getattr(_sys, "orig_argv", ()))
        pairs = zip(orig, [*orig[1:], ""], strict=True)
        return any(a == "-mqcowlib" or (a == "-m" and b == "qcowlib") for a, b in pairs)
    return _os.path.basename(argv0) in ("qcowlib", "qcowlib.exe")


# First thing when this package runs as the command: from here on a signal during
# start-up ends it without a traceback.  Only modules the interpreter has loaded
# already are used (an import is itself a window).  The command line replaces these
# handlers with qcowlib.core.interrupt's, which unwind and clean up, once it can.
if _runs_as_program() and (_signals := _sys.modules.get("_signal")) is not None:
    for _signum in (2, 15, 1):  # SIGINT, SIGTERM, SIGHUP
        if _signals.getsignal(_signum) != _signals.SIG_IGN:
            _signals.signal(_signum, _stop_at_start)

import os  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from qcowlib.errors import (  # noqa: E402
    BackingChainError,
    BackingFormatUnknown,
    BackingLoop,
    BackingMismatch,
    BackingNotFound,
    BackingTooDeep,
    CorruptImage,
    DiskClosed,
    FormatError,
    ImageLocked,
    InvalidArgument,
    QcowlibError,
    QcowlibFileNotFoundError,
    QcowlibIOError,
    QcowlibPermissionError,
    SourceChanged,
    TruncatedImage,
    UnsafeBackingPath,
    UnsupportedFeature,
)

if TYPE_CHECKING:
    from qcowlib.checkreport import CheckReport
    from qcowlib.core.chain import BackingPolicy
    from qcowlib.core.disk import Disk, Extent, ExtentKind
    from qcowlib.formats import formats
    from qcowlib.formats.qcow2.writer import Qcow2RWDisk
    from qcowlib.formats.registry import FormatInfo
    from qcowlib.glance.request import UploadRequest
    from qcowlib.glance.upload import upload
    from qcowlib.ops.amend import amend
    from qcowlib.ops.bitmap import bitmap
    from qcowlib.ops.check import check
    from qcowlib.ops.checksum import checksum
    from qcowlib.ops.compare import CompareResult
    from qcowlib.ops.convert import convert
    from qcowlib.ops.create import create
    from qcowlib.ops.dd import dd
    from qcowlib.ops.flatten import FlattenStream, flatten, flatten_stream
    from qcowlib.ops.info import info
    from qcowlib.ops.measure import measure
    from qcowlib.ops.snapshot import (
        SnapshotInfo,
        apply_snapshot,
        create_snapshot,
        delete_snapshot,
        list_snapshots,
    )
    from qcowlib.validate import validate
    from qcowlib.validate.model import ValidationReport
    from qcowlib.validate.registry import RuleInfo

__all__ = [
    "BackingChainError",
    "BackingFormatUnknown",
    "BackingLoop",
    "BackingMismatch",
    "BackingNotFound",
    "BackingPolicy",
    "BackingTooDeep",
    "CheckReport",
    "CompareResult",
    "CorruptImage",
    "Disk",
    "DiskClosed",
    "Extent",
    "ExtentKind",
    "FlattenStream",
    "FormatError",
    "FormatInfo",
    "ImageLocked",
    "InvalidArgument",
    "QcowlibError",
    "QcowlibFileNotFoundError",
    "QcowlibIOError",
    "QcowlibPermissionError",
    "RuleInfo",
    "SnapshotInfo",
    "SourceChanged",
    "TruncatedImage",
    "UnsafeBackingPath",
    "UnsupportedFeature",
    "UploadRequest",
    "ValidationReport",
    "amend",
    "apply_snapshot",
    "bitmap",
    "check",
    "checksum",
    "compare",
    "convert",
    "create",
    "create_snapshot",
    "dd",
    "delete_snapshot",
    "flatten",
    "flatten_stream",
    "formats",
    "info",
    "list_snapshots",
    "measure",
    "open",
    "open_rw",
    "upload",
    "validate",
    "validation_rules",
]

__version__ = "0.1.0"

_LAZY = {
    "Disk": ("qcowlib.core.disk", "Disk"),
    "Extent": ("qcowlib.core.disk", "Extent"),
    "ExtentKind": ("qcowlib.core.disk", "ExtentKind"),
    "BackingPolicy": ("qcowlib.core.chain", "BackingPolicy"),
    "CheckReport": ("qcowlib.checkreport", "CheckReport"),
    "CompareResult": ("qcowlib.ops.compare", "CompareResult"),
    "convert": ("qcowlib.ops.convert", "convert"),
    "create": ("qcowlib.ops.create", "create"),
    "measure": ("qcowlib.ops.measure", "measure"),
    "check": ("qcowlib.ops.check", "check"),
    "checksum": ("qcowlib.ops.checksum", "checksum"),
    "flatten": ("qcowlib.ops.flatten", "flatten"),
    "flatten_stream": ("qcowlib.ops.flatten", "flatten_stream"),
    "FlattenStream": ("qcowlib.ops.flatten", "FlattenStream"),
    "FormatInfo": ("qcowlib.formats.registry", "FormatInfo"),
    "RuleInfo": ("qcowlib.validate.registry", "RuleInfo"),
    "ValidationReport": ("qcowlib.validate.model", "ValidationReport"),
    "upload": ("qcowlib.glance.upload", "upload"),
    "UploadRequest": ("qcowlib.glance.request", "UploadRequest"),
    "info": ("qcowlib.ops.info", "info"),
    "SnapshotInfo": ("qcowlib.ops.snapshot", "SnapshotInfo"),
    "list_snapshots": ("qcowlib.ops.snapshot", "list_snapshots"),
    "create_snapshot": ("qcowlib.ops.snapshot", "create_snapshot"),
    "apply_snapshot": ("qcowlib.ops.snapshot", "apply_snapshot"),
    "delete_snapshot": ("qcowlib.ops.snapshot", "delete_snapshot"),
    "amend": ("qcowlib.ops.amend", "amend"),
    "bitmap": ("qcowlib.ops.bitmap", "bitmap"),
    "dd": ("qcowlib.ops.dd", "dd"),
}


def open(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    backing_policy: "BackingPolicy | str | None" = None,
    force_share: bool = False,
    backing: "BackingPolicy | None" = None,
) -> "Disk":
    """Open an image read-only with its backing chain; the format is probed unless given.

    Use as a context manager.  ``backing_policy`` controls what may be followed:
    ``"follow"`` (the default, as qemu-img), ``"contained"`` (only relative names that
    stay inside the image's directory after resolving symlinks, with a recorded
    format), ``"none"`` (the top image alone; unallocated ranges read as zeros), or a
    :class:`BackingPolicy` (``backing`` is its older spelling).  Devices, FIFOs,
    sockets, directories and /proc or /sys files are never opened as backing, data or
    extent files.  Images are locked as qemu-img locks them: one that another process
    holds open for writing raises :class:`ImageLocked`, unless ``force_share`` (``-U``).
    Raises :class:`QcowlibError` subclasses for anything wrong with the files (a
    missing file: :class:`QcowlibFileNotFoundError`, also a ``FileNotFoundError``; no
    permission: :class:`QcowlibPermissionError`, also a ``PermissionError``).  Reading a
    closed disk raises :class:`DiskClosed`.
    """
    from qcowlib.formats.opener import open_disk

    policy = backing_policy if backing_policy is not None else backing
    return open_disk(path, fmt, policy, force_share=force_share)


def open_rw(
    path: str | os.PathLike[str], *, backing_policy: "BackingPolicy | str | None" = None
) -> "Qcow2RWDisk":
    """Open a qcow2 image for writing (its backing chain read-only).

    The disk has ``write(offset, data)``, ``write_zeroes``, ``discard``, ``resize``,
    ``flush`` and ``close``.  QEMU's image locks are taken: an image that a VM or
    qemu-io has open for writing raises :class:`ImageLocked`.  Images marked corrupt
    or left dirty raise :class:`CorruptImage` (repair them with ``check -r all``).
    The backing chain is opened as ``backing_policy`` allows (see :func:`open`), with
    the shared read locks QEMU takes on the backing files of an image it writes.
    """
    from qcowlib.formats.opener import open_rw as _open_rw

    return _open_rw(path, policy=backing_policy)


def compare(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    fmt_a: str | None = None,
    fmt_b: str | None = None,
    strict: bool = False,
    backing_policy: "BackingPolicy | str | None" = None,
    force_share: bool = False,
) -> "CompareResult":
    """Compare the guest content of two images, as ``qemu-img compare``.

    ``backing_policy`` and ``force_share`` apply to both images, as in :func:`open`.
    """
    from qcowlib.formats.opener import open_disk
    from qcowlib.ops.compare import compare as _compare

    pol, share = backing_policy, force_share
    with (
        open_disk(a, fmt_a, pol, force_share=share) as da,
        open_disk(b, fmt_b, pol, force_share=share) as db,
    ):
        return _compare(da, db, strict=strict)


def validation_rules() -> "list[RuleInfo]":
    """Every rule ``validate`` runs (built-in, registered, from entry points), in order,
    with its name, severity and description (``qcowlib validate --list-rules``)."""
    from qcowlib.validate.registry import describe_rules

    return describe_rules()


def __getattr__(name: str) -> object:
    """The names in ``__all__`` that load on first use (see ``_LAZY``)."""
    if name in ("validate", "formats"):
        # Callable packages: qcowlib.validate(path, ...) validates and
        # qcowlib.validate.register(rule) adds a rule; qcowlib.formats() lists the
        # registry and qcowlib.formats.registry is importable.  Return the package, so the
        # name means the same whether it is first used as a function or as a module.
        import importlib

        return importlib.import_module(f"qcowlib.{name}")
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'qcowlib' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Every public name, loaded or not (``dir(qcowlib)``, ``help(qcowlib)``)."""
    return sorted(set(globals()) | set(__all__))
