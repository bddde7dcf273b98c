"""Fixed-size records declared once, parsed and built with :mod:`struct`.

The qcow2 header is read by every command, ``info`` included, so its layout is declared
here rather than with construct: importing construct costs more than the rest of a
header read (~25 ms of a ~40 ms budget for ``qcowlib info``).  A layout is a list of
``(name, struct code)`` pairs in one byte order; :meth:`FixedLayout.as_construct` gives
the same layout as a construct ``Struct``, and the tests check that both agree.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from qcowlib.errors import TruncatedImage

__all__ = ["FixedLayout", "Record"]

_CONSTRUCT_INTS = {"B": "Int8u", "H": "Int16u", "I": "Int32u", "Q": "Int64u"}


class Record(dict[str, Any]):
    """Parsed fields by name, as items and as attributes (``rec.version``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class FixedLayout:
    """A record of fixed-size fields: integers (``B H I Q``) and byte strings (``Ns``).

    ``byteorder`` is ``">"`` (big-endian) or ``"<"``; ``what`` names the structure in
    errors.
    """

    def __init__(self, what: str, byteorder: str, fields: Sequence[tuple[str, str]]) -> None:
        if byteorder not in "<>" or not fields:
            raise ValueError("a layout needs a byte order and fields")
        self.what = what
        self.byteorder = byteorder
        self.fields = tuple(fields)
        self._struct = struct.Struct(byteorder + "".join(code for _, code in fields))
        self._names = tuple(name for name, _ in fields)
        self._offsets: dict[str, int] = {}
        at = 0
        for name, code in fields:
            self._offsets[name] = at
            at += struct.calcsize(byteorder + code)

    def sizeof(self) -> int:
        return self._struct.size

    def offset_of(self, name: str) -> int:
        """Where field ``name`` starts, in bytes from the start of the record (errors
        name it; no table of offsets kept beside the layout)."""
        return self._offsets[name]

    def parse(self, data: bytes | bytearray | memoryview, offset: int = 0) -> Record:
        """The fields at the start of ``data`` (which sits at ``offset`` in the file)."""
        if len(data) < self._struct.size:
            raise TruncatedImage(
                f"{self.what} is truncated ({len(data)} of {self._struct.size} bytes)",
                structure=self.what,
                offset=offset,
            )
        return Record(zip(self._names, self._struct.unpack_from(data), strict=True))

    def build(self, values: Mapping[str, Any]) -> bytes:
        """The record's bytes; byte strings shorter than their field are NUL-padded."""
        return self._struct.pack(*(values[name] for name in self._names))

    def as_construct(self) -> Any:
        """The same layout as a construct ``Struct`` (imports construct)."""
        import construct as cs

        order = "b" if self.byteorder == ">" else "l"
        parts = []
        for name, code in self.fields:
            if code.endswith("s"):
                parts.append(name / cs.Bytes(int(code[:-1] or 1)))
            else:
                parts.append(name / getattr(cs, _CONSTRUCT_INTS[code] + order))
        return cs.Struct(*parts)
