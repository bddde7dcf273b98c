"""Placement of a new qcow2 image's data: packed, non-overlapping, refcounts exact."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowlib.formats.qcow2 import refcount as rc
from qcowlib.formats.qcow2.placement import DataPlacer

chunks = st.lists(
    st.lists(st.one_of(st.just(0), st.integers(1, 5000)), max_size=12), min_size=1, max_size=8
)


def reference(cs: int, order: int, start: int, plan: list[list[int]]) -> tuple[list[int], int]:
    """QEMU's packing rule, one payload at a time (compressed first in each chunk)."""
    max_ref = rc.max_refcount(order)
    counts: dict[int, int] = {}
    pos = start
    out: list[int] = []
    for clen in plan:
        host = [0] * len(clen)
        for i, n in enumerate(clen):
            if not n:
                continue
            if pos % cs and counts.get(pos // cs, 0) >= max_ref:
                pos = (pos // cs + 1) * cs
            host[i] = pos
            for c in range(pos // cs, (pos + n - 1) // cs + 1):
                counts[c] = counts.get(c, 0) + 1
            pos += n
        plain = [i for i, n in enumerate(clen) if not n]
        if plain:
            pos = -(-pos // cs) * cs
            for i in plain:
                host[i] = pos
                counts[pos // cs] = 1
                pos += cs
        out += host
    return out, pos


@settings(max_examples=200, deadline=None)
@given(
    plan=chunks,
    cs=st.sampled_from([512, 4096, 65536]),
    order=st.integers(0, 4),
    start_clusters=st.integers(1, 4),
)
def test_placement_matches_the_one_by_one_rule(
    plan: list[list[int]], cs: int, order: int, start_clusters: int
) -> None:
    plan = [[min(n, cs) for n in chunk] for chunk in plan]
    start = start_clusters * cs
    placer = DataPlacer(cs, order, start, start // cs + 2)
    got: list[int] = []
    for clen in plan:
        got += placer.place_chunk(np.array(clen, dtype=np.int64)).tolist()
    want, end = reference(cs, order, start, plan)
    assert got == want
    assert placer.pos == end
    counts = placer.refcounts(start)
    assert counts.max(initial=0) <= rc.max_refcount(order)
    # Every stored byte lies in a cluster with a refcount, and nothing overlaps.
    spans = sorted(
        (h, h + (n or cs)) for h, n in zip(got, [n for c in plan for n in c], strict=True)
    )
    for (_, a1), (b0, _) in itertools.pairwise(spans):
        assert a1 <= b0
    for a, b in spans:
        assert all(counts[c] > 0 for c in range(a // cs, (b - 1) // cs + 1))
