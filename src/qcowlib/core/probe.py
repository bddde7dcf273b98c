"""What a format's probe returns, and the one buffer size QEMU's probes share.

Each format package has a ``probe.py`` with one pure function
``probe(head, tail, file_size) -> Match | None`` (QEMU: a ``BlockDriver``'s
``bdrv_probe``); the registry names it with its place in the probing order, and
:mod:`qcowlib.formats.detect` asks them in that order.  A probe never raises and opens
no file: ``head`` is the first bytes of the file, ``tail`` the last ones, both possibly
shorter than asked for (and both empty for an empty file).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NamedTuple

__all__ = ["QEMU_PROBE_BUF_SIZE", "Match", "ProbeFunction"]

#: QEMU's BLOCK_PROBE_BUF_SIZE: how much of the file qemu's probes see.  The VMDK text
#: descriptor is only looked for there, so that qcowlib agrees with qemu-img about it.
QEMU_PROBE_BUF_SIZE: Final[int] = 2048


class Match(NamedTuple):
    """A probe's "this is my format"; ``detail`` refines it where the caller cares
    (see :class:`qcowlib.formats.detect.Probe`)."""

    detail: str | None = None


ProbeFunction = Callable[[bytes, bytes, int], "Match | None"]
