"""VHDX output: ``-o subformat=dynamic|fixed`` (no stream writer yet)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from qcowlib.core.drivers import Progress, SubformatDriver

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk


def _write(disk: Disk, fd: int, *, subformat: str, progress: Progress | None) -> None:
    from qcowlib.formats.vhdx.output import write_vhdx

    write_vhdx(disk, fd, subformat=subformat, progress=progress)


VHDX: Final = SubformatDriver("vhdx", _write)
