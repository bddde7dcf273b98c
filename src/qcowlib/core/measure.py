"""What a format's ``measure`` part is (QEMU: a ``BlockDriver``'s ``bdrv_measure``), and
what every format's measuring shares: the typed ``-o`` options and the count of clusters
the source's data touches.

A format that can be measured names a :class:`SizeMeasure` in its registry entry
(``formats/<fmt>/measure.py``); :mod:`qcowlib.ops.measure` parses the options against
``options`` and calls ``measure``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Final, NamedTuple

from qcowlib._units import div_round_up, parse_option_bool, parse_option_number, parse_option_size
from qcowlib.core.disk import Extent, ExtentKind
from qcowlib.errors import InvalidArgument

if TYPE_CHECKING:
    from qcowlib.core.disk import Disk

__all__ = [
    "BOOL",
    "FILE_OPTIONS",
    "NUMBER",
    "SIZE",
    "STRING",
    "OptionValues",
    "SizeMeasure",
    "allocated_clusters",
    "parse_options",
]

# Option types as declared by QEMU's creation option lists (``qemu-img create -o help``).
BOOL, NUMBER, SIZE, STRING = "bool", "number", "size", "string"
#: file-posix's creation options, which qemu-img appends to every format's list.
FILE_OPTIONS: Final[Mapping[str, str]] = {
    "size": SIZE,
    "preallocation": STRING,
    "nocow": BOOL,
    "extent_size_hint": SIZE,
}

OptionValues = Mapping[str, "bool | int | str"]


class SizeMeasure(NamedTuple):
    """A format's ``measure``: its creation options (name -> type, as QEMU declares
    them) and the function that sizes a new image of a source ``Disk`` (or, with None,
    an empty one of ``opts["size"]``), returning qemu-img measure's JSON object."""

    options: Mapping[str, str]
    measure: Callable[[OptionValues, Disk | None], dict[str, int]]


def parse_options(
    out_format: str, declared: Mapping[str, str], options: Mapping[str, str]
) -> dict[str, bool | int | str]:
    """Check ``options`` against the output format's creation options, as
    ``qemu_opts_do_parse`` does: unknown names and badly typed values are refused."""
    parsed: dict[str, bool | int | str] = {}
    for key, value in options.items():
        kind = declared.get(key)
        if kind is None:
            raise InvalidArgument(
                f"Invalid parameter '{key}' (invalid options for file format '{out_format}')"
            )
        if kind == BOOL:
            parsed[key] = parse_option_bool(key, value)
        elif kind == NUMBER:
            parsed[key] = parse_option_number(key, value)
        elif kind == SIZE:
            parsed[key] = parse_option_size(key, value)
        else:
            parsed[key] = value
    return parsed


def _counts(ext: Extent) -> bool:
    """Whether qemu's block status for this run is allocated data, not zero."""
    if ext.kind is ExtentKind.COMPRESSED:
        return True
    return ext.kind is ExtentKind.DATA and not ext.hole


def allocated_units(disk: Disk, cluster_size: int) -> int:
    """:func:`allocated_clusters` of ``disk``'s whole chain, from its run arrays a window
    at a time (no Python step per run: an image whose tables repeat one fragmented
    table millions of times is counted in seconds, not minutes)."""
    from qcowlib.core.runs import RunSource

    return RunSource(disk).nonzero_unit_count(cluster_size)


def allocated_clusters(extents: Iterable[Extent], cluster_size: int) -> int:
    """Clusters of ``cluster_size`` touched by data in resolved, ordered ``extents``.

    qemu-img walks block status and, on a data run, counts from the start of its first
    cluster to the end of its last, then resumes at that cluster boundary; the result is
    the number of output clusters that contain any data.
    """
    count = 0
    counted_until = 0  # first cluster index not yet counted
    for ext in extents:
        if ext.length == 0 or not _counts(ext):
            continue
        first = max(ext.start // cluster_size, counted_until)
        last = div_round_up(ext.end, cluster_size)
        if last > first:
            count += last - first
            counted_until = last
    return count
