"""Image formats: one package or module per format, and the registry that lists them.

This package is itself callable: ``qcowlib.formats()`` lists the registry (see
:func:`qcowlib.formats.registry.describe`), so the name means the same whether it is
first used as the function the top-level package exports or imported as a package.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import inspect

    from qcowlib.formats.registry import FormatInfo


def formats() -> list[FormatInfo]:
    """Every format qcowlib knows, with what it can do: read, write (``convert -O``),
    stream (``flatten -O``, upload), create and check."""
    from qcowlib.formats.registry import describe

    return describe()


class _CallablePackage(types.ModuleType):
    """``qcowlib.formats()`` describes every format; submodules import as usual."""

    def __call__(self) -> list[FormatInfo]:
        return formats()

    @property
    def __signature__(self) -> inspect.Signature:
        """:func:`formats`'s, for ``inspect.signature`` and ``help()``."""
        import inspect

        return inspect.signature(formats)


sys.modules[__name__].__class__ = _CallablePackage
