"""JSON values as the API returns them (``--output json`` objects), typed without ``Any``.

This module imports nothing from qcowlib.
"""

from __future__ import annotations

from typing import TypeAlias

__all__ = ["JSONObject", "JSONValue"]

#: Any value :func:`json.loads` can return.
JSONValue: TypeAlias = str | int | float | bool | list["JSONValue"] | dict[str, "JSONValue"] | None
#: A JSON object (what ``--output json`` prints for one image).
JSONObject: TypeAlias = dict[str, JSONValue]
