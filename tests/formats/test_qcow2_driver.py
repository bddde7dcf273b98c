"""The pieces of the qcow2 driver that the in-place writer and ``check`` share: header
field patches, the overlap checks, the refcount store and refcount span encoding."""

from __future__ import annotations

import numpy as np
import pytest

from qcowlib.errors import CorruptImage
from qcowlib.formats.qcow2 import overlap as ol
from qcowlib.formats.qcow2.hostio import field_patch
from qcowlib.formats.qcow2.refcount import decode_block, encode_block, encode_span
from qcowlib.formats.qcow2.refcount_store import RefcountStore

CS = 65536


class MemFile:
    """A host file in memory: reads past the end give zeros."""

    path = "mem.qcow2"

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.size = len(data)
        self.reads: list[tuple[int, int]] = []

    def pread(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return bytes(self.data[offset : offset + length]).ljust(length, b"\0")

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        end = offset + len(data)
        if end > len(self.data):
            self.data += bytes(end - len(self.data))
        self.data[offset:end] = data
        self.size = max(self.size, end)

    def truncate(self, size: int) -> None:
        del self.data[size:]
        self.data += bytes(size - len(self.data))
        self.size = size

    def punch_hole(self, offset: int, length: int) -> bool:
        return False

    def sync(self) -> None:
        pass


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"size": 1 << 30}, (24, (1 << 30).to_bytes(8, "big"))),
        (
            {"l1_table_offset": 0x30000, "l1_size": 2},
            (36, bytes.fromhex("00000002" + "30000".zfill(16))),
        ),
        (
            {"nb_snapshots": 1, "snapshots_offset": CS},
            (60, bytes.fromhex("00000001" + "10000".zfill(16))),
        ),
        ({"incompatible_features": 2}, (72, (2).to_bytes(8, "big"))),
    ],
)
def test_field_patch(fields: dict[str, int], expected: tuple[int, bytes]) -> None:
    assert field_patch(**fields) == expected


def test_field_patch_refuses_fields_apart() -> None:
    with pytest.raises(ValueError, match="adjacent"):
        field_patch(size=0, nb_snapshots=0)


def _areas() -> ol.MetadataAreas:
    l1 = np.array([4 * CS | (1 << 63), 0, 9 * CS], dtype=np.uint64)
    reftable = np.array([2 * CS, 0], dtype=np.uint64)
    return ol.MetadataAreas(
        cluster_size=CS,
        l1=(3 * CS, 24),
        refcount_table=(CS, CS),
        l1_table=l1,
        reftable_entries=reftable,
        snapshot_table=(5 * CS, CS + 100),
        inactive_l1=[(8 * CS, 16)],
        bitmap_directory=(20 * CS, 40),
    )


@pytest.mark.parametrize(
    ("offset", "size", "ign", "allow", "hit"),
    [
        (100, 8, 0, None, ol.QCOW2_OL_MAIN_HEADER),
        (CS + 8, 8, 0, None, ol.QCOW2_OL_REFCOUNT_TABLE),
        (2 * CS, CS, 0, None, ol.QCOW2_OL_REFCOUNT_BLOCK),
        (2 * CS, CS, ol.QCOW2_OL_REFCOUNT_BLOCK, None, 0),
        (2 * CS + 16, 2, 0, 2, 0),  # the block's own cluster may change
        (2 * CS, 2 * CS, 0, 2, ol.QCOW2_OL_ACTIVE_L1),  # but not the next one
        (3 * CS, 8, 0, None, ol.QCOW2_OL_ACTIVE_L1),
        (4 * CS + 512, 8, 0, None, ol.QCOW2_OL_ACTIVE_L2),
        (6 * CS + 50, 8, 0, None, ol.QCOW2_OL_SNAPSHOT_TABLE),
        (7 * CS, CS, 0, None, 0),
        (8 * CS, 8, 0, None, ol.QCOW2_OL_INACTIVE_L1),
        (9 * CS, 8, 0, None, ol.QCOW2_OL_ACTIVE_L2),
        (20 * CS + 32, 100, 0, None, ol.QCOW2_OL_BITMAP_DIRECTORY),
        (21 * CS, 10 * CS, 0, None, 0),
        (7 * CS, 0, 0, None, 0),
    ],
)
def test_first_overlap(offset: int, size: int, ign: int, allow: int | None, hit: int) -> None:
    assert _areas().first_overlap(offset, size, ign=ign, allow=allow) == hit


def _store(order: int, refcounts: dict[int, int], *, blocks: int = 1) -> RefcountStore:
    """A 64 KiB-cluster image: refcount table at cluster 1, blocks from cluster 2."""
    f = MemFile(bytes(CS * (2 + blocks)))
    per = CS * 8 >> order
    table = np.zeros(CS // 8, dtype=np.uint64)
    for b in range(blocks):
        values = np.zeros(per, dtype=np.uint64)
        for c, v in refcounts.items():
            if c // per == b:
                values[c % per] = v
        table[b] = (2 + b) * CS
        f.pwrite((2 + b) * CS, encode_block(values, order))
    return RefcountStore(f, table, 16, order, strict=True)


@pytest.mark.parametrize("order", [0, 1, 4, 6])
def test_store_lookups(order: int) -> None:
    store = _store(order, {0: 1, 1: 1, 5: 1, 7: 1})
    values, errors = store.get(np.array([0, 5, 6, 7, 1 << 30], dtype=np.uint64))
    assert values.tolist() == [1, 1, 0, 1, 0] and not errors.any()
    assert store.get_one(7) == 1 and store.get_one(8) == 0
    stored, failed = store.stored_range(4, 9)
    assert stored.tolist() == [0, 1, 0, 1, 0] and failed is None


@pytest.mark.parametrize(
    ("used", "count", "start", "expected"),
    [
        ({0: 1, 1: 1}, 1, 0, 2),
        ({0: 1, 1: 1, 3: 1}, 2, 0, 4),
        ({0: 1, 1: 1, 3: 1}, 1, 0, 2),
        ({0: 1, 5: 1}, 3, 4, 6),
        (dict.fromkeys(range(70_000), 1), 4, 0, 70_000),
    ],
)
def test_store_find_free(used: dict[int, int], count: int, start: int, expected: int) -> None:
    assert _store(4, used, blocks=3).find_free(count, start) == expected


def test_store_strict_refuses_blocks_past_the_end() -> None:
    store = _store(4, {0: 1})
    store.table[1] = 100 * CS
    with pytest.raises(CorruptImage, match="past the end"):
        store.get_one(store.per_block + 1)


def test_store_set_and_take_dirty() -> None:
    store = _store(4, {0: 1})
    store.set(9, 3)
    [(offset, block)] = store.take_dirty()
    assert offset == 2 * CS and int(block[9]) == 3
    assert store.take_dirty() == []


@pytest.mark.parametrize("order", range(7))
def test_encode_span_matches_the_whole_block(order: int) -> None:
    per = CS * 8 >> order
    rng = np.random.default_rng(order)
    block = rng.integers(0, 1 << min(1 << order, 63), per, dtype=np.uint64)
    whole = encode_block(block, order)
    for lo, hi in [(0, 1), (3, 4), (5, 17), (per - 3, per)]:
        first_byte, data = encode_span(block, lo, hi, order)
        assert whole[first_byte : first_byte + len(data)] == data
        assert first_byte <= lo * (1 << order) // 8
        decoded = decode_block(whole, order)
        assert np.array_equal(decoded[lo:hi], block[lo:hi])
