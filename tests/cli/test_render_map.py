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


def _c_hex(value: int) -> str:
    """C's ``%#x``: ``0`` without a prefix, ``0x...`` otherwise."""
    return "0" if value == 0 else hex(value)


def _human_whole(entries: list[MapEntry]) -> tuple[str, str | None]:
    """qemu-img's human map, written out independently of the code under test."""
    out = "Offset          Length          Mapped to       File\n"
    for e in entries:
        if e.data and e.offset is None:
            return out, "File contains external, encrypted or compressed clusters."
        if e.data and not e.zero:
            cols = (_c_hex(e.start), _c_hex(e.length), _c_hex(e.offset or 0))
            out += "".join(f"{c:<16}" for c in cols) + f"{e.filename or ''}\n"
    return out, None


@given(_entries, st.integers(1, 5))
def test_human_in_batches_equals_the_whole(entries: list[MapEntry], batch: int) -> None:
    out: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(render, "MAP_BATCH", batch)
        error = render.write_human_map(iter(entries), out.append)
    assert ("".join(out), error) == _human_whole(entries)


def _failing(n: int) -> Iterator[MapEntry]:
    for i in range(n):
        yield MapEntry(i * 512, 512, 0, True, False, True, i * 1024, "f")
    raise CorruptImage("bad L2 entry")


@pytest.mark.parametrize("found", [0, 1, 2, 3, 5])
def test_an_error_midway_leaves_what_qemu_img_leaves(found: int) -> None:
    """qemu-img prints ``[``, then each entry with ``,`` and a newline once the next is
    known, and stops at a metadata error with its list unclosed; the human form keeps
    its header and the lines found."""
    rows = [
        f'{{ "start": {i * 512}, "length": 512, "depth": 0, "present": true, "zero": false,'
        f' "data": true, "offset": {i * 1024}}}'
        for i in range(found)
    ]
    human = "".join(
        f"{_c_hex(i * 512):<16}{_c_hex(512):<16}{_c_hex(i * 1024):<16}f\n" for i in range(found)
    )
    for batch in (1, 2, 4096):
        out: list[str] = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(render, "MAP_BATCH", batch)
            with pytest.raises(CorruptImage):
                render.write_map_json(_failing(found), out.append)
            assert "".join(out) == "[" + "".join(r + ",\n" for r in rows)
            out.clear()
            with pytest.raises(CorruptImage):
                render.write_human_map(_failing(found), out.append)
            assert "".join(out) == _human_whole([])[0] + human
