"""QED images against qemu-img: reads, ``info``, ``map`` and ``check`` (with repair)
as qemu-img 7.2 gives them, backing chains, the need-check flag, hostile headers and
tables, and the header codec on arbitrary bytes."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowlib.errors import QcowlibError
from qcowlib.formats.qed import codec as qed
from tests.conftest import qemu_img, qemu_io
from tests.formats.oracle import (
    assert_check_like_qemu,
    assert_converts_to_qcow2,
    assert_info_and_map_like_qemu,
    assert_reads_like_qemu,
    assert_refused,
    ours_raw,
    poke,
)

pytestmark = pytest.mark.usefixtures("qemu")

WRITES = (
    "write -P 0x11 0 100k",
    "write -P 0x22 1m 4k",
    "write -z 2m 256k",
    "write -P 0x33 3000k 70k",
    "discard 1m 4k",
    "write -P 0x44 7m 1m",
)


def make_qed(path: Path, *opts: str, size: str = "8M", writes: tuple[str, ...] = WRITES) -> Path:
    qemu_img("create", "-q", "-f", "qed", *opts, path, size)
    if writes:
        qemu_io(path, "qed", *writes)
    return path


def l1_offset(path: Path) -> int:
    return int(struct.unpack_from("<Q", path.read_bytes(), 40)[0])


@pytest.mark.parametrize(
    "opts",
    [(), ("-o", "cluster_size=4k,table_size=2"), ("-o", "cluster_size=1M,table_size=16")],
    ids=["default", "4k-clusters", "1M-clusters"],
)
def test_reads_info_map_check_like_qemu(tmp_path: Path, opts: tuple[str, ...]) -> None:
    p = make_qed(tmp_path / "a.qed", *opts)
    assert_reads_like_qemu(p, tmp_path)
    assert_info_and_map_like_qemu(p)
    assert_check_like_qemu(p, tmp_path)
    assert_converts_to_qcow2(p, tmp_path)


def test_empty_and_odd_sizes(tmp_path: Path) -> None:
    for size in ("0", "512", "1000000"):
        p = make_qed(tmp_path / f"s{size}.qed", size=size, writes=())
        assert_reads_like_qemu(p, tmp_path)
        assert_info_and_map_like_qemu(p)


@pytest.mark.parametrize("backing_fmt", ["raw", "qcow2"])
def test_backing_chain(tmp_path: Path, backing_fmt: str) -> None:
    base = tmp_path / f"base.{backing_fmt}"
    qemu_img("create", "-q", "-f", backing_fmt, base, "6M")
    qemu_io(base, backing_fmt, "write -P 0x5a 0 6M")
    top = tmp_path / "top.qed"
    qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", backing_fmt, top, "8M")
    qemu_io(top, "qed", "write -P 0x66 64k 8k", "write -z 1m 64k", "write -P 1 7m 4k")
    flags = struct.unpack_from("<Q", top.read_bytes(), 16)[0]
    assert bool(flags & qed.QED_F_BACKING_FORMAT_NO_PROBE) == (backing_fmt == "raw")
    assert_reads_like_qemu(top, tmp_path)
    assert_info_and_map_like_qemu(top, chain=True)
    assert_check_like_qemu(top, tmp_path)
    assert_converts_to_qcow2(top, tmp_path)


def test_need_check_flag_reads_and_is_repaired(tmp_path: Path) -> None:
    p = make_qed(tmp_path / "dirty.qed")
    poke(p, 16, struct.pack("<Q", qed.QED_F_NEED_CHECK))
    # qemu-img info says false: draining the new image clears the flag in memory.
    assert_info_and_map_like_qemu(p)
    assert_reads_like_qemu(p, tmp_path)
    assert_check_like_qemu(p, tmp_path)
    assert_check_like_qemu(p, tmp_path, repair="all")  # clears the flag, as QEMU


def corrupt(p: Path) -> None:
    """Invalid and duplicate L1/L2 entries, and a leaked cluster."""
    l1 = l1_offset(p)
    l2 = int(struct.unpack_from("<Q", p.read_bytes(), l1)[0])
    poke(p, l1 + 8 * 20, struct.pack("<Q", 0x10000 * 3 + 5))  # misaligned L2 table
    poke(p, l1 + 8 * 21, struct.pack("<Q", l1))  # the L1 table as an L2 table
    poke(p, l2 + 8 * 3, struct.pack("<Q", 0x10000))  # inside the header
    poke(p, l2 + 8 * 5, struct.pack("<Q", 0x7777))  # misaligned data cluster
    poke(p, l2 + 8 * 6, struct.pack("<Q", l2))  # the L2 table as data


@pytest.mark.parametrize("repair", [None, "leaks", "all"])
def test_check_and_repair_of_a_corrupted_image(tmp_path: Path, repair: str | None) -> None:
    p = make_qed(tmp_path / "bad.qed", size="64M")
    corrupt(p)
    with p.open("ab") as f:
        f.write(bytes(0x10000))  # a leaked cluster
    assert_check_like_qemu(p, tmp_path, repair=repair)


def test_bad_l2_entry_is_refused_when_read(tmp_path: Path) -> None:
    p = make_qed(tmp_path / "bad.qed")
    l2 = int(struct.unpack_from("<Q", p.read_bytes(), l1_offset(p))[0])
    poke(p, l2, struct.pack("<Q", 1 << 40))  # past the end of the file
    assert qemu_img("convert", "-O", "raw", p, tmp_path / "q.raw", check=False).returncode
    assert_refused(p, "entry[0]")
    with pytest.raises(QcowlibError, match="invalid cluster offset"):
        ours_raw(p)


HEADER_POKES = [
    (4, "<I", 3, "cluster size"),  # not a power of two
    (4, "<I", 1 << 30, "cluster size"),
    (8, "<I", 1, "L1 table offset"),  # table_size 1: QEMU refuses every table too
    (8, "<I", 32, "table size"),
    (12, "<I", 0xFFFFFFFF, "L1 table offset"),  # the L1 table is inside the header
    (16, "<Q", 0x100, "unsupported QED features"),
    (40, "<Q", 1 << 50, "L1 table offset"),  # past the end of the file
    (40, "<Q", 0x10001, "L1 table offset"),
    (48, "<Q", 1000, "image size"),  # not a multiple of 512
    (48, "<Q", 1 << 62, "image size"),
]


@pytest.mark.parametrize(("at", "fmt", "value", "words"), HEADER_POKES)
def test_hostile_headers_are_refused_as_qemu_refuses_them(
    tmp_path: Path, at: int, fmt: str, value: int, words: str
) -> None:
    p = make_qed(tmp_path / "h.qed", writes=())
    poke(p, at, struct.pack(fmt, value))
    assert qemu_img("info", p, check=False).returncode == 1
    assert_refused(p, words)


def test_backing_name_outside_the_header_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "b.raw"
    base.write_bytes(bytes(1 << 20))
    p = tmp_path / "t.qed"
    qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", "raw", p, "1M")
    poke(p, 56, struct.pack("<I", 0xFFFF0000))
    assert qemu_img("info", p, check=False).returncode == 1
    assert_refused(p, "backing filename")


def test_truncated_files(tmp_path: Path) -> None:
    p = make_qed(tmp_path / "t.qed")
    for size in (64, 0x10000 + 100):
        q = tmp_path / f"t{size}.qed"
        q.write_bytes(p.read_bytes()[:size])
        assert_refused(q)
    # Shorter than a header: still QED for QEMU's probe (zero-filled), and refused.
    q = tmp_path / "t10.qed"
    q.write_bytes(p.read_bytes()[:10])
    assert "QED table offset is invalid" in qemu_img("info", q, check=False).stderr
    assert_refused(q, "truncated")


@given(st.binary(max_size=128), st.integers(0, 1 << 40))
@settings(max_examples=400)
def test_header_parse_or_raise(data: bytes, file_size: int) -> None:
    with contextlib.suppress(QcowlibError):
        qed.parse_header(data, file_size)


@given(
    st.integers(0, 1 << 32),
    st.integers(0, 32),
    st.integers(0, 1 << 33),
    st.integers(0, 7),
    st.integers(0, 1 << 64 - 1),
    st.integers(0, 1 << 64 - 1),
    st.integers(0, 1 << 40),
)
@settings(max_examples=400)
def test_signed_header_parse_or_raise(
    cs: int, ts: int, hs: int, features: int, l1: int, size: int, file_size: int
) -> None:
    raw = qed.QED_MAGIC + struct.pack(
        "<III3QQQII", cs & 0xFFFFFFFF, ts, hs & 0xFFFFFFFF, features, 0, 0, l1, size, 64, 8
    )
    with contextlib.suppress(QcowlibError):
        h = qed.parse_header(raw, file_size)
        assert h.l1_table_offset + h.table_bytes <= file_size
        assert h.image_size <= qed.max_image_size(h.cluster_size, h.table_size)


@given(st.binary(min_size=0, max_size=4096))
@settings(max_examples=200)
def test_l2_classify_or_raise(raw: bytes) -> None:
    h = qed.parse_header(
        qed.QED_MAGIC + struct.pack("<III3QQQII", 4096, 2, 1, 0, 0, 0, 4096, 1 << 20, 0, 0), 1 << 20
    )
    table = (raw * (8192 // max(1, len(raw)) + 1))[:8192] if raw else bytes(8192)
    with contextlib.suppress(QcowlibError):
        _, host = qed.classify_l2(h, qed.decode_table(table, h, 8192), 8192)
        assert ((host == -1) | ((host >= 4096) & (host < 1 << 20))).all()
