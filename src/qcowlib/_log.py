"""Loggers that import :mod:`logging` only when something is logged.

``logging`` pulls in ``traceback``, ``threading``, ``weakref`` and ``string`` (~5 ms, a
tenth of a metadata command's run).  Modules take their logger from :func:`get_logger`;
the command line registers its handler set-up with :func:`configure_on_use`, which runs
at the first log call (or at once when :mod:`logging` is already loaded).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    import logging

_setup: list[Callable[[], None]] = []


class _LazyLogger:
    """Stands in for ``logging.getLogger(name)`` until an attribute is used."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> object:
        import logging

        while _setup:
            _setup.pop()()
        return getattr(logging.getLogger(self._name), attr)


def get_logger(name: str) -> logging.Logger:
    """The logger ``name``, importing :mod:`logging` at its first use."""
    return cast("logging.Logger", _LazyLogger(name))


def configure_on_use(setup: Callable[[], None]) -> None:
    """Run ``setup`` (handlers, level) before the first record is logged."""
    if "logging" in sys.modules:
        setup()
    else:
        _setup.append(setup)
