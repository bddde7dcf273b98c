"""``bitmap``: persistent dirty bitmaps, as ``qemu-img bitmap`` (add, remove, clear,
enable, disable, merge).  The work is the format's ``bitmap`` part in the registry
(qcow2's is :mod:`qcowlib.formats.qcow2.bitmap_rw`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from qcowlib.core import interrupt
from qcowlib.core.chain import BackingPolicy
from qcowlib.errors import InvalidArgument, UnsupportedFeature

__all__ = ["OPERATIONS", "bitmap"]

#: The operations, as qemu-img names them.
OPERATIONS = ("add", "remove", "clear", "enable", "disable", "merge")


def bitmap(
    path: str | os.PathLike[str],
    name: str,
    actions: Sequence[tuple[str, str | None]],
    *,
    granularity: int | None = None,
    source_file: str | os.PathLike[str] | None = None,
    source_fmt: str | None = None,
    fmt: str | None = None,
) -> None:
    """Apply ``actions`` (``(operation, merge source or None)``, in order) to bitmap
    ``name`` of ``path``.  ``granularity`` is ``-g`` (with ``add``); ``source_file``
    (``-b``, format ``source_fmt`` or probed) holds the merge sources.

    Raises :class:`~qcowlib.errors.InvalidArgument` with qemu-img's messages
    (``Operation add on bitmap b0 failed: Bitmap already exists: b0``) and
    :class:`~qcowlib.errors.UnsupportedFeature` for formats without bitmaps.
    """
    from qcowlib.formats import registry
    from qcowlib.formats.qcow2.bitmap_rw import BitmapAction
    from qcowlib.ops.modify import _format_of

    if not actions:
        raise InvalidArgument(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"
        )
    ops = [op for op, _ in actions]
    if any(op not in OPERATIONS for op in ops):
        raise InvalidArgument(f"unknown bitmap operation in {ops}")
    if granularity is not None and "add" not in ops:
        raise InvalidArgument("granularity only supported with --add")
    if source_file is not None and "merge" not in ops:
        raise InvalidArgument("Merge bitmap source file only supported with --merge")
    if source_fmt is not None and source_file is None:
        raise InvalidArgument("-F is only supported with -b")
    path = os.fspath(path)
    fmt = _format_of(path, fmt)
    entry = registry.by_name(fmt)
    if entry.bitmap is None:
        raise UnsupportedFeature(f"{fmt} images have no persistent bitmaps")
    part = entry.implementation("bitmap")
    sources = (
        _read_sources(part, actions, os.fspath(source_file), source_fmt) if source_file else {}
    )
    steps = [BitmapAction(op, src) for op, src in actions]
    with interrupt.deferred():  # in place: a signal waits until the change is whole
        part.run(path, name, steps, granularity, sources)


def _read_sources(
    part: Any,
    actions: Sequence[tuple[str, str | None]],
    source_file: str,
    source_fmt: str | None,
) -> dict[str, Any]:
    """The merge sources' bits from ``source_file`` (opened read-only, alone)."""
    from qcowlib.formats.opener import open_disk

    out: dict[str, Any] = {}
    with open_disk(source_file, source_fmt, BackingPolicy(follow=False)) as disk:
        for op, src in actions:
            if op == "merge" and src is not None and src not in out:
                try:
                    out[src] = part.read(disk, src)
                except InvalidArgument as exc:
                    exc.message = f"Operation merge on bitmap {src} failed: {exc.message}"
                    exc.args = (exc.message,)
                    raise
    return out
