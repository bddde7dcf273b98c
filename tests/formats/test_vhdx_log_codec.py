"""The pure VHDX log codec (formats/vhdx/log.py): entries built by the test-side builder
parse back, and arbitrary logs are searched and planned or refused with QcowlibError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcowlib.errors import CorruptImage, QcowlibError, UnsupportedFeature
from qcowlib.formats.vhdx import log as vhdx_log
from tests.formats.vhdx_log_builder import LOG_GUID, MIB, SECTOR, Data, Zero, entry

FILE_SIZE = 16 * MIB
LOG_AT = MIB

descriptors = st.lists(
    st.one_of(
        st.builds(
            Data,
            offset=st.integers(0, 2**64 - 1).map(lambda n: n & ~(SECTOR - 1)),
            sector=st.binary(min_size=SECTOR, max_size=SECTOR),
        ),
        st.builds(
            Zero,
            offset=st.integers(0, 2**64 - 1).map(lambda n: n & ~(SECTOR - 1)),
            length=st.integers(0, 2**64 - 1).map(lambda n: n & ~(SECTOR - 1)),
        ),
    ),
    max_size=5,
)
entries = st.builds(
    lambda seq, descs, flushed, last, pad: entry(seq, descs, flushed=flushed, last=last, pad=pad),
    seq=st.integers(1, 2**64 - 1),
    descs=descriptors,
    flushed=st.integers(0, 2**64 - 1),
    last=st.integers(0, 2**64 - 1),
    pad=st.integers(0, 2),
)


def _ring(placed: list[tuple[int, bytes]], length: int) -> bytes:
    ring = bytearray(length)
    for pos, raw in placed:
        for i in range(0, len(raw), SECTOR):
            at = (pos * SECTOR + i) % length
            ring[at : at + SECTOR] = raw[i : i + SECTOR]
    return bytes(ring)


def _search_and_plan(log: bytes) -> None:
    """Search and plan, or raise QcowlibError; a plan stays inside its limits."""
    try:
        seq = vhdx_log.find_active_sequence(log, LOG_GUID, LOG_AT)
        if seq is None:
            return
        assert seq.count >= 1 and 0 <= seq.start < len(log)
        plan = vhdx_log.plan_replay(log, LOG_GUID, seq, FILE_SIZE, LOG_AT)
    except QcowlibError:
        return
    cap = FILE_SIZE + vhdx_log.MAX_REPLAY_GROWTH
    for step in plan.steps:
        if isinstance(step, int):
            assert step <= cap
            continue
        assert step.offset + step.length <= cap
        assert step.offset >= vhdx_log.PROTECTED_END
        assert not (step.offset + step.length > LOG_AT and step.offset < LOG_AT + len(log))
        assert step.data is None or len(step.data) == SECTOR


@given(st.binary(max_size=3 * SECTOR), st.integers(1, 4))
@settings(max_examples=200)
def test_arbitrary_log_bytes(data: bytes, sectors: int) -> None:
    log = data[: sectors * SECTOR].ljust(sectors * SECTOR, b"\0")
    _search_and_plan(log)
    _search_and_plan(b"loge" + log[4:])


@given(st.lists(st.tuples(st.integers(0, 15), entries), max_size=4))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_entries_in_a_ring(placed: list[tuple[int, bytes]]) -> None:
    _search_and_plan(_ring(placed, 16 * SECTOR))


@given(
    st.integers(1, 2**64 - 1),
    descriptors,
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
)
@settings(max_examples=100)
def test_build_parse_round_trip(
    seq: int, descs: list[Data | Zero], flushed: int, last: int, tail: int
) -> None:
    raw = entry(seq, descs, flushed=flushed, last=last, tail=tail)
    h = vhdx_log.parse_entry_header(raw)
    assert (h.signature, h.entry_length, h.tail, h.sequence_number) == (
        b"loge",
        len(raw),
        tail,
        seq,
    )
    assert (h.descriptor_count, h.log_guid) == (len(descs), LOG_GUID)
    assert (h.flushed_file_offset, h.last_file_offset) == (flushed, last)
    assert vhdx_log.entry_checksum(raw) == h.checksum
    data_at = vhdx_log.descriptor_sectors(len(descs)) * SECTOR
    for i, d in enumerate(descs):
        parsed = vhdx_log.parse_descriptor(raw[64 + 32 * i :])
        assert parsed.file_offset == d.offset and parsed.sequence_number == seq
        if isinstance(d, Zero):
            assert parsed.is_zero and parsed.zero_length == d.length
        else:
            assert not parsed.is_zero
            assert parsed.leading_bytes.to_bytes(8, "little") == d.sector[:8]
            assert parsed.trailing_bytes.to_bytes(4, "little") == d.sector[4092:]
            number, payload = vhdx_log.parse_data_sector(raw[data_at:])
            assert number == seq and payload == d.sector[8:4092]
            data_at += SECTOR
    # a 1 MiB log holding just this entry: found as its own sequence
    log = raw.ljust(MIB, b"\0")
    found = vhdx_log.find_active_sequence(log, LOG_GUID, LOG_AT)
    assert found is not None and (found.start, found.count, found.first) == (0, 1, h)


def test_descriptor_sectors() -> None:
    assert [vhdx_log.descriptor_sectors(n) for n in (0, 126, 127, 254, 255)] == [1, 1, 2, 2, 3]


def test_short_structures_are_truncated() -> None:
    for parse in (
        vhdx_log.parse_entry_header,
        vhdx_log.parse_descriptor,
        vhdx_log.parse_data_sector,
    ):
        with pytest.raises(QcowlibError):
            parse(b"\0" * 10)


def test_log_fields() -> None:
    vhdx_log.check_log_fields(MIB, MIB, 0, 0, present=True)
    vhdx_log.check_log_fields(MIB, 12345, 0, 0, present=False)  # no log: length unused
    for args in ((0, MIB, 0), (MIB + 1, MIB, 0), (MIB, MIB, 1), (MIB, MIB + 1, 0)):
        with pytest.raises(CorruptImage):
            vhdx_log.check_log_fields(*args, 0, present=True)
    with pytest.raises(UnsupportedFeature):
        vhdx_log.check_log_fields(MIB, vhdx_log.MAX_LOG_LENGTH + MIB, 0, 0, present=True)


def test_whole_log_entry_with_bad_checksum() -> None:
    raw = bytearray(entry(5, [Data(4 * MIB, bytes(SECTOR))], flushed=0, last=0, pad=2))
    raw[4:8] = struct.pack("<I", 0)
    with pytest.raises(CorruptImage, match="search this log forever"):
        vhdx_log.find_active_sequence(bytes(raw), LOG_GUID, LOG_AT)


def test_scan_stops_at_the_checksum_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlapping long entries with sound checksums can make QEMU's scan checksum the
    whole log once per sector (minutes for an 8 MiB log); qcowlib's scan stops once it
    has checksummed CHECKSUM_BUDGET times the log.  A sound log is checksummed about
    once: it passes with a budget of 1, and trips a smaller one."""
    log = bytearray(MIB)
    first = entry(7, [Data(4 * MIB, bytes(SECTOR))] * 3, flushed=0, last=0, pad=60)
    second = entry(8, [Zero(5 * MIB, SECTOR)], flushed=0, last=0, pad=120)
    log[: len(first)] = first
    log[len(first) : len(first) + len(second)] = second
    spent: list[int] = []
    real_crc = vhdx_log.entry_checksum

    def counting(data: bytes) -> int:
        spent.append(len(data))
        return real_crc(data)

    monkeypatch.setattr(vhdx_log, "entry_checksum", counting)
    monkeypatch.setattr(vhdx_log, "CHECKSUM_BUDGET", 1)
    found = vhdx_log.find_active_sequence(bytes(log), LOG_GUID, LOG_AT)
    assert found is not None and found.count == 2
    assert sum(spent) <= MIB
    monkeypatch.setattr(vhdx_log, "CHECKSUM_BUDGET", 0.25)
    with pytest.raises(CorruptImage, match="checksum more than"):
        vhdx_log.find_active_sequence(bytes(log), LOG_GUID, LOG_AT)
