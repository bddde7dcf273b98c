"""Extent lines of a VMDK descriptor, matched the way QEMU 7.2 matches them.

QEMU's ``vmdk_parse_extents`` runs, at the start of every line, the C conversion
``"%10s %" SCNd64 " %10s \\"%511[^\\n\\r\\"]\\" %" SCNd64`` (access, sectors, type,
file name, offset) and goes by how many fields matched.  Its quirks decide which lines
become extents, so :func:`scan_extent_line` reproduces that conversion here: C
whitespace (which includes newlines) is skipped before every field, words stop at 10
characters, names at 511, numbers are decimal with an optional sign and saturate.

Pure: text in, fields out.
"""

from __future__ import annotations

from typing import Final, NamedTuple

_SPACE: Final = frozenset(" \t\n\v\f\r")
_INT64_MAX: Final = (1 << 63) - 1
_INT64_MIN: Final = -(1 << 63)


class ExtentMatch(NamedTuple):
    """What the conversion matched: ``matched`` fields, the rest ``None`` past it.

    ``first`` is where the first field starts: past a newline when the line was blank.
    """

    matched: int
    access: str | None = None
    sectors: int | None = None
    type: str | None = None
    name: str | None = None
    offset: int | None = None
    first: int = 0


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _SPACE:
        i += 1
    return i


def _word(text: str, i: int, width: int) -> tuple[str | None, int]:
    i = _skip(text, i)
    j = i
    while j < len(text) and j - i < width and text[j] not in _SPACE:
        j += 1
    return (text[i:j] or None), j


def _int64(text: str, i: int) -> tuple[int | None, int]:
    i = _skip(text, i)
    j = i
    if j < len(text) and text[j] in "+-":
        j += 1
    k = j
    while k < len(text) and "0" <= text[k] <= "9":
        k += 1
    if k == j:
        return None, i
    value = int(text[i:k])
    return max(_INT64_MIN, min(_INT64_MAX, value)), k


def _name(text: str, i: int) -> tuple[str | None, bool, int]:
    """``"%511[^\\n\\r\"]\"``: the name (assigned as soon as one character matched),
    whether the closing quote followed it, and where matching stopped."""
    i = _skip(text, i)
    if i >= len(text) or text[i] != '"':
        return None, False, i
    j = i + 1
    while j < len(text) and j - i - 1 < 511 and text[j] not in '\n\r"':
        j += 1
    if j == i + 1:
        return None, False, i
    closed = j < len(text) and text[j] == '"'
    return text[i + 1 : j], closed, j + 1 if closed else j


def scan_extent_line(text: str, start: int) -> ExtentMatch:
    """Match an extent line at ``text[start:]`` as QEMU's ``sscanf`` does (see module)."""
    access, i = _word(text, start, 10)
    if access is None:
        return ExtentMatch(0)
    first = i - len(access)
    sectors, i = _int64(text, i)
    if sectors is None:
        return ExtentMatch(1, access, first=first)
    etype, i = _word(text, i, 10)
    if etype is None:
        return ExtentMatch(2, access, sectors, first=first)
    name, closed, i = _name(text, i)
    if name is None:
        return ExtentMatch(3, access, sectors, etype, first=first)
    # sscanf has assigned the name; a missing closing quote (or a name longer than 511
    # characters) ends the match there, with four items.
    offset, i = _int64(text, i) if closed else (None, i)
    if offset is None:
        return ExtentMatch(4, access, sectors, etype, name, first=first)
    return ExtentMatch(5, access, sectors, etype, name, offset, first)


def line_starts(text: str) -> list[int]:
    """Where QEMU's ``next_line`` stops: 0 and after every newline before the end."""
    starts = [0] if text else []
    at = text.find("\n")
    while at != -1 and at + 1 < len(text):
        starts.append(at + 1)
        at = text.find("\n", at + 1)
    return starts
