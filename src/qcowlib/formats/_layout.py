"""Parsing fixed-size construct layouts with qcowlib's errors."""

from __future__ import annotations

from typing import Any

import construct as cs

from qcowlib.errors import FormatError, TruncatedImage


def parse_fixed(layout: Any, data: bytes | bytearray | memoryview, what: str, offset: int) -> Any:
    """Parse a fixed-size ``layout`` from the start of ``data``.

    A buffer shorter than the layout is a :class:`TruncatedImage` naming ``what`` and
    ``offset`` (where ``data`` sits in the file).
    """
    size = layout.sizeof()
    if len(data) < size:
        raise TruncatedImage(
            f"{what} is truncated ({len(data)} of {size} bytes)", structure=what, offset=offset
        )
    try:
        return layout.parse(bytes(data[:size]))
    except cs.ConstructError as exc:  # pragma: no cover - fixed-size layouts
        raise FormatError(f"cannot parse {what}: {exc}", structure=what, offset=offset) from None
