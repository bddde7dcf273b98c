"""One entry-point group, listed without :mod:`importlib.metadata` where that is possible.

``importlib.metadata`` costs ~20 ms to import (email, zipfile, csv, pathlib...), more
than the rest of a small ``validate``; listing one group needs only the
``entry_points.txt`` files of the distributions on ``sys.path``.  :func:`group_entries`
reads them with :func:`os.scandir` and answers as
``importlib.metadata.entry_points(group=...)`` does: the same distributions (``*.dist-info``
and ``*.egg-info`` in every directory of ``sys.path``, the first of a name winning), the
same parsing of ``entry_points.txt`` (stripped lines, ``#`` comments, ``[section]``
headers, ``name = value``), the same order.  Where the scan cannot be sure to agree
(a zip file or a ``*.egg`` directory on ``sys.path``, a metadata directory whose name
does not give its distribution's name, another distribution finder installed in
:data:`sys.meta_path`), it asks ``importlib.metadata`` instead.

:func:`load` imports what an entry point names, as ``EntryPoint.load`` does.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Final

__all__ = ["group_entries", "load", "scan"]


@functools.cache
def _value_pattern() -> re.Pattern[str]:
    """``EntryPoint.pattern``: ``module``, ``module:attr.attr``, with optional ``[extras]``
    (compiled when an entry point is loaded, not on every validation)."""
    return re.compile(r"(?P<module>[\w.]+)\s*(:\s*(?P<attr>[\w.]+)\s*)?((?P<extras>\[.*\])\s*)?$")


_SUFFIXES: Final = (".dist-info", ".egg-info")


def group_entries(group: str) -> list[tuple[str, str]]:
    """``(name, value)`` of every entry point in ``group``, in
    ``importlib.metadata.entry_points(group=group)`` order.

    Raises what reading the metadata raises (``OSError``, ``UnicodeDecodeError``,
    ``ValueError`` for a line that is not ``name = value``).
    """
    found = scan(group, sys.path)
    if found is not None:
        return found
    from importlib.metadata import entry_points

    return [(ep.name, ep.value) for ep in entry_points(group=group)]


def scan(group: str, path: Iterable[object]) -> list[tuple[str, str]] | None:
    """The entries of ``group`` in the distributions found along ``path``, or None when
    only ``importlib.metadata`` can tell (see the module's docstring)."""
    if not _only_path_finder():
        return None
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for root in path:
        if not isinstance(root, str):
            return None
        dirs = _metadata_dirs(root)
        if dirs is None:
            return None
        for name, meta in dirs:
            if name in seen:
                continue  # importlib.metadata keeps the first distribution of a name
            seen.add(name)
            text = _read_text(os.path.join(meta, "entry_points.txt"))
            if text is not None:
                found.extend(_section(text, group))
    return found


def _only_path_finder() -> bool:
    """Whether :class:`importlib.machinery.PathFinder` is the only distribution finder."""
    from importlib.machinery import PathFinder

    return all(
        finder is PathFinder or getattr(finder, "find_distributions", None) is None
        for finder in sys.meta_path
    )


def _metadata_dirs(root: str) -> list[tuple[str, str]] | None:
    """``(normalized name, path)`` of the metadata directories in ``root``, in directory
    order; None where ``root`` is not a plain directory of distributions."""
    try:
        with os.scandir(root or ".") as it:
            names = [entry.name for entry in it]
    except OSError:
        # importlib.metadata reads a file as a zip archive; a missing directory is empty.
        return None if os.path.isfile(root) else []
    if root.lower().endswith(".egg") and any(n.lower() == "egg-info" for n in names):
        return None  # named by its PKG-INFO only
    out: list[tuple[str, str]] = []
    for child in names:
        if not child.lower().endswith(_SUFFIXES):
            continue
        stem, ext = os.path.splitext(child)
        if ext not in _SUFFIXES:
            return None  # e.g. FOO.DIST-INFO: importlib.metadata reads its METADATA
        out.append((_normalize(stem.partition("-")[0]), os.path.join(root, child)))
    return out


def _normalize(name: str) -> str:
    """PEP 503 normalisation with underscores, as ``importlib.metadata`` compares names."""
    out = name.lower().replace("-", "_").replace(".", "_")
    while "__" in out:  # re.sub(r"[-_.]+", "_", ...) without compiling a pattern
        out = out.replace("__", "_")
    return out


def _read_text(path: str) -> str | None:
    # os.open and os.read: a validation reads this file of each installed distribution,
    # most of them absent or a few hundred bytes; no buffered text object is needed.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except IsADirectoryError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8")


def _section(text: str, group: str) -> Iterator[tuple[str, str]]:
    """``importlib.metadata``'s ``Sectioned`` parse of ``entry_points.txt``, one group."""
    section: str | None = None
    for line in map(str.strip, text.splitlines()):
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line.strip("[]")
            continue
        if section is None:
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"entry point line {line!r} in [{section}] is not 'name = value'")
        if section == group:
            yield name.strip(), value.strip()


def load(value: str) -> object:
    """The object an entry point's value names (``module:attr.attr``), imported.

    Raises :class:`ValueError` for a value that names no module, and whatever importing
    the module or getting the attribute raises.
    """
    match = _value_pattern().match(value)
    if match is None:
        raise ValueError(f"{value!r} is not 'module' or 'module:attribute'")
    module = importlib.import_module(match.group("module"))
    attrs = filter(None, (match.group("attr") or "").split("."))
    return functools.reduce(getattr, attrs, module)
