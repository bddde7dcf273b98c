"""``amend``: change an existing image's format options in place, as ``qemu-img amend``.

The work is the format's ``amend`` part in the registry (qcow2's is
:mod:`qcowlib.formats.qcow2.amend`); formats without one are refused as qemu-img
refuses them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from qcowlib.core import interrupt
from qcowlib.errors import UnsupportedFeature

__all__ = ["amend", "amend_option_help"]


def amend(
    path: str | os.PathLike[str],
    options: Mapping[str, str],
    *,
    fmt: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Apply qemu-img amend's ``-o`` ``options`` (for qcow2: ``compat``,
    ``lazy_refcounts``, ``refcount_bits``, ``backing_file``, ``backing_fmt``, ``size``)
    to ``path``.  The format is probed unless ``fmt`` is given.

    Raises :class:`~qcowlib.errors.InvalidArgument` and
    :class:`~qcowlib.errors.UnsupportedFeature` with qemu-img's messages for what it
    refuses, and the usual open errors.
    """
    from qcowlib.ops.modify import _format_of

    path = os.fspath(path)
    fmt = _format_of(path, fmt)
    # In place: a signal waits until the image is whole again (the format stops at
    # interrupt.checkpoint() between steps that each leave it consistent).
    with interrupt.deferred():
        _part(fmt).run(path, options, progress)


def amend_option_help(fmt: str) -> str:
    """``amend -o help``: the options format ``fmt`` can change, as qemu-img lists them."""
    return str(_part(fmt).option_help())


def _part(fmt: str) -> Any:
    from qcowlib.formats import registry

    entry = registry.by_name(fmt)
    if entry.amend is None:
        raise UnsupportedFeature(f"Format driver '{fmt}' does not support option amendment")
    return entry.implementation("amend")
