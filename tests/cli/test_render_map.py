"""``map`` output is written as the entries come, in batches, byte for byte as qemu-img."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcowlib.cli import render
from qcowlib.errors import CorruptImage
from qcowlib.ops.map import MapEntry

_entries = st.lists(
    st.builds(
        MapEntry,
        st.integers(0, 1 << 40),
        st.integers(0, 1 << 30),
        st.integers(0, 3),
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.one_of(st.none(), st.integers(0, 1 << 40)),
        st.one_of(st.none(), st.just("f.qcow2")),
    ),
    max_size=12,
)


def _json_whole(entries: list[MapEntry]) -> str:
    """The whole list at once (what the streamed writer must equal)."""
    rows = []
    for e in entries:
        present, zero, data = (str(flag).lower() for flag in (e.present, e.zero, e.data))
        row = (
            f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, "present": '
            f'{present}, "zero": {zero}, "data": {data}'
        )
        rows.append(row + (f', "offset": {e.offset}' if e.offset is not None else "") + "}")
    return "[" + ",\n".join(rows) + "]\n"


@given(_entries, st.integers(1, 5))
def test_json_in_batches_equals_the_whole(entries: list[MapEntry], batch: int) -> None:
    out: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(render, "MAP_BATCH", batch)
        render.write_map_json(iter(entries), out.append)
    assert "".join(out) == _json_whole(entries)
    assert len(out) <= len(entries) // batch + 1  # batched, not a write per entry


@given(_entries, st.integers(1, 5))
def test_human_in_batches_equals_the_whole(entries: list[MapEntry], batch: int) -> None:
    whole: list[str] = []
    expected_error = render.write_human_map(iter(entries), whole.append)
    out: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(render, "MAP_BATCH", batch)
        error = render.write_human_map(iter(entries), out.append)
    assert ("".join(out), error) == ("".join(whole), expected_error)
    assert "".join(out).startswith("Offset          Length          Mapped to       File\n")


def test_an_error_midway_leaves_what_was_written() -> None:
    """qemu-img prints entry by entry and stops at a metadata error, its list unclosed."""

    def entries() -> Iterator[MapEntry]:
        for i in range(5):
            yield MapEntry(i * 512, 512, 0, True, False, True, i * 512, "f")
        raise CorruptImage("bad L2 entry")

    out: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(render, "MAP_BATCH", 2)
        with pytest.raises(CorruptImage):
            render.write_map_json(entries(), out.append)
    assert "".join(out).startswith('[{ "start": 0, "length": 512')
    assert not "".join(out).endswith("]\n")
