"""VHDX output: ``-o subformat=dynamic|fixed``, written or streamed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from qcowlib.core.drivers import SubformatDriver

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk
    from qcowlib.formats.vhdx.output import VhdxLayout


def _layout(disk: Disk, subformat: str) -> VhdxLayout:
    from qcowlib.formats.vhdx.output import VhdxLayout

    return VhdxLayout(disk, subformat=subformat)


VHDX: Final = SubformatDriver("vhdx", _layout)
