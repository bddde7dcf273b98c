"""VHD (``vpc``) output: ``-o subformat=dynamic|fixed``, written or streamed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from qcowlib.core.drivers import SubformatDriver

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.formats.vhd.output import VhdLayout


def _layout(disk: Disk, subformat: str) -> VhdLayout:
    from qcowlib.formats.vhd.output import VhdLayout

    return VhdLayout(disk, subformat=subformat)


VPC: Final = SubformatDriver("vpc", _layout)
