"""VHD (``vpc``) output: ``-o subformat=dynamic|fixed`` (no stream writer yet)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from qcowlib.core.drivers import Progress, SubformatDriver

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk


def _write(disk: Disk, fd: int, *, subformat: str, progress: Progress | None) -> None:
    from qcowlib.formats.vhd.output import write_vhd

    write_vhd(disk, fd, subformat=subformat, progress=progress)


VPC: Final = SubformatDriver("vpc", _write)
