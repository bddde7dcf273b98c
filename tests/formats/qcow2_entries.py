"""Hypothesis strategies for qcow2 L2 entries, hostile ones included: shared by the
tests of the table codecs and of the reader that poke them into images."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from qcowlib.formats.qcow2 import entries


@st.composite
def entry_chunk(draw: st.DrawFn, cluster_bits: int) -> list[int]:
    """A few L2 entries: runs of contiguous clusters (data, preallocated zero), plain
    zero clusters, compressed descriptors, or anything at all (hostile bits)."""
    cs = 1 << cluster_bits
    shape = draw(st.sampled_from(["run"] * 5 + ["zero", "compressed", "random", "empty"] * 2))
    n = draw(st.integers(1, 6))
    if shape == "empty":
        return [0] * draw(st.integers(1, 300))
    if shape == "random":
        return draw(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=n))
    if shape == "compressed":
        bits = st.integers(0, (1 << 62) - 1)  # host offset and sector count
        copied = draw(st.sampled_from([0, entries.OFLAG_COPIED]))
        return [entries.OFLAG_COMPRESSED | copied | draw(bits) for _ in range(n)]
    # 0: a data file's first cluster (with OFLAG_COPIED), or none
    first = draw(st.sampled_from([0, cs, draw(st.integers(2, 8)) * cs]))
    skew = draw(st.sampled_from([0] * 18 + [512, cs // 2]))  # misaligned hosts
    flags = draw(st.sampled_from([0, entries.OFLAG_COPIED, entries.OFLAG_ZERO]))
    flags |= draw(st.sampled_from([0, 0, entries.OFLAG_ZERO, entries.L2E_STD_RESERVED_MASK]))
    if shape == "zero":
        flags |= entries.OFLAG_ZERO
        first = draw(st.sampled_from([0, first]))
    step = draw(st.sampled_from([cs, cs, 0, 2 * cs]))
    return [flags | (((first + k * step) | skew) & entries.OFFSET_MASK) for k in range(n)]


@st.composite
def bitmap(draw: st.DrawFn) -> int:
    """A subcluster bitmap: allocated and zero halves, as QEMU writes them or not."""
    alloc = draw(st.sampled_from([0, 0xFFFF_FFFF, draw(st.integers(0, 2**32 - 1))]))
    some = draw(st.integers(0, 2**32 - 1))
    zero = draw(st.sampled_from([0, ~alloc & 0xFFFF_FFFF, some & ~alloc, some]))
    return alloc | (zero << 32)


@st.composite
def chunk_words(draw: st.DrawFn, cluster_bits: int, extended: bool) -> list[int]:
    """An :func:`entry_chunk` as table words: each entry followed by its subcluster
    bitmap with extended L2 (none, all allocated, or one drawn for the chunk)."""
    chunk = draw(entry_chunk(cluster_bits))
    if not extended:
        return chunk
    choices = st.sampled_from([0, 0xFFFF_FFFF, draw(bitmap())])
    bitmaps = draw(st.lists(choices, min_size=len(chunk), max_size=len(chunk)))
    return [w for pair in zip(chunk, bitmaps, strict=True) for w in pair]


@st.composite
def l2_tables(draw: st.DrawFn) -> tuple[bytes, int, bool, bool]:
    """An L2 table's bytes (standard or extended) for a cluster size of 512 B..2 MiB."""
    cluster_bits = draw(st.integers(9, 21))
    extended = draw(st.booleans())
    has_data_file = draw(st.booleans())
    chunks = draw(st.lists(chunk_words(cluster_bits, extended), min_size=1, max_size=8))
    words = [w for chunk in chunks for w in chunk]
    return struct.pack(f">{len(words)}Q", *words), cluster_bits, extended, has_data_file
