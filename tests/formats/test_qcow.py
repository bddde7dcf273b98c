"""Legacy QCOW (version 1) images against qemu-img: reads (compressed clusters too),
``info`` and ``map`` as qemu-img 7.2 gives them, backing chains, ``check`` refused as
qemu-img refuses it, encrypted and hostile images refused, and the header codec on
arbitrary bytes."""

from __future__ import annotations

import contextlib
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowlib.errors import CorruptImage, QcowlibError
from qcowlib.formats.qcow import codec as qcow
from tests.conftest import cli, qemu_img, qemu_io, qemu_json, seeded_raw
from tests.formats.oracle import (
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
    "write -z 2m 64k",
    "write -P 0x33 3000k 70k",
    "write -c -P 0x44 4m 4k",
    "write -c -P 0x45 4100k 4k",
)


def make_qcow(path: Path, *opts: str, size: str = "6M") -> Path:
    qemu_img("create", "-q", "-f", "qcow", *opts, path, size)
    qemu_io(path, "qcow", *WRITES)
    return path


def test_qemu_io_image_like_qemu(tmp_path: Path) -> None:
    p = make_qcow(tmp_path / "a.qcow")
    assert_reads_like_qemu(p, tmp_path)
    assert_info_and_map_like_qemu(p)
    assert_converts_to_qcow2(p, tmp_path)


@pytest.mark.parametrize("compress", [False, True])
def test_converted_images_like_qemu(tmp_path: Path, compress: bool) -> None:
    raw = seeded_raw(tmp_path / "src.raw", 5 * 1024 * 1024, 7)
    with raw.open("r+b") as f:
        f.seek(3 << 20)
        f.write(b"".join(b"line %d of some text\n" % i for i in range(20000)))
    p = tmp_path / "c.qcow"
    # qemu-img 7.2 writes a good compressed qcow but exits 1 (qcow's compressed write
    # returns a byte count that convert takes for an error): the image is what counts.
    qemu_img("convert", "-f", "raw", "-O", "qcow", *(["-c"] if compress else []), raw, p,
             check=not compress)  # fmt: skip
    assert qemu_img("compare", "-f", "raw", raw, p).returncode == 0
    if compress:  # compressed clusters have no offset in the map
        assert any(e["data"] and "offset" not in e for e in qemu_json("map", p))
    assert ours_raw(p) == raw.read_bytes()
    assert_info_and_map_like_qemu(p)
    assert_converts_to_qcow2(p, tmp_path)


def test_odd_size_rounds_down_to_sectors(tmp_path: Path) -> None:
    p = tmp_path / "odd.qcow"
    qemu_img("create", "-q", "-f", "qcow", p, "4M")
    poke(p, 24, struct.pack(">Q", 4 * 1024 * 1024 + 300))
    assert_info_and_map_like_qemu(p)
    assert_reads_like_qemu(p, tmp_path)


@pytest.mark.parametrize("backing_fmt", ["raw", "qcow2", "qcow"])
def test_backing_chain(tmp_path: Path, backing_fmt: str) -> None:
    base = tmp_path / f"base.{backing_fmt}"
    qemu_img("create", "-q", "-f", backing_fmt, base, "3M")
    qemu_io(base, backing_fmt, "write -P 0x5a 0 3M")
    top = tmp_path / "top.qcow"
    qemu_img("create", "-q", "-f", "qcow", "-b", base.name, "-F", backing_fmt, top, "4M")
    qemu_io(top, "qcow", "write -P 0x66 64k 8k", "write -P 1 3584k 4k")
    assert_reads_like_qemu(top, tmp_path)
    assert_info_and_map_like_qemu(top, chain=True)
    assert_converts_to_qcow2(top, tmp_path)


def test_check_is_not_supported_as_in_qemu(tmp_path: Path) -> None:
    p = make_qcow(tmp_path / "a.qcow")
    theirs = qemu_img("check", p, check=False)
    ours = cli("check", p)
    assert ours.returncode == theirs.returncode == 63
    assert ours.stdout == theirs.stdout == ""


def test_encrypted_image_shows_in_info_and_is_refused_for_data(tmp_path: Path) -> None:
    """As qemu-img without a key: ``info`` shows ``encrypted: yes``; reading fails."""
    p = tmp_path / "enc.qcow"
    qemu_img(
        "create", "-q", "--object", "secret,id=s0,data=abc", "-f", "qcow",
        "-o", "encrypt.format=aes,encrypt.key-secret=s0", p, "1M",
    )  # fmt: skip
    assert struct.unpack_from(">I", p.read_bytes(), 36)[0] == qcow.QCOW_CRYPT_AES
    for args in ((), ("--output=json",)):
        assert cli("info", *args, p).stdout == qemu_img("info", *args, p).stdout
    assert qemu_img("map", p, check=False).returncode == 1
    assert_refused(p, "encrypt.key-secret", "AES-CBC")


def l2_offset(path: Path) -> int:
    data = path.read_bytes()
    l1 = struct.unpack_from(">Q", data, 40)[0]
    return int(struct.unpack_from(">Q", data, l1)[0])


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        (1 << 40, "entry[0]"),  # past the end of the file
        (4096 + 3, "entry[0]"),  # not 512-aligned
        (qcow.QCOW_OFLAG_COMPRESSED | (1 << 40), "entry[0]"),
        (qcow.QCOW_OFLAG_COMPRESSED | (100 << 51) | 4096, "inflate"),  # not deflate
    ],
)
def test_bad_l2_entries_are_refused(tmp_path: Path, entry: int, words: str) -> None:
    p = make_qcow(tmp_path / "bad.qcow")
    poke(p, l2_offset(p), struct.pack(">Q", entry))
    assert_refused(p, words)
    with pytest.raises(QcowlibError):
        ours_raw(p)


HEADER_POKES = [
    (4, ">I", 2, "cluster_bits"),  # now a qcow2 header, which does not parse
    (24, ">Q", 1, "too small"),
    (32, ">B", 8, "cluster size"),
    (32, ">B", 17, "cluster size"),
    (33, ">B", 14, "L2 table size"),
    (36, ">I", 7, "encryption method"),
    (40, ">Q", 1 << 50, "past the end"),  # L1 table outside the file
    (24, ">Q", (1 << 64) - 1, "too large"),
    (24, ">Q", 1 << 58, "too large"),  # an L1 table larger than QEMU allows
    (16, ">I", 5000, "backing file name too long"),
]


@pytest.mark.parametrize(("at", "fmt", "value", "words"), HEADER_POKES)
def test_hostile_headers_are_refused(
    tmp_path: Path, at: int, fmt: str, value: int, words: str
) -> None:
    p = tmp_path / "h.qcow"
    qemu_img("create", "-q", "-f", "qcow", "-u", "-b", "x.raw", "-F", "raw", p, "1M")
    poke(p, at, struct.pack(fmt, value))
    assert_refused(p, words)


def test_decompress() -> None:
    data = bytes(range(256)) * 16
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    packed = c.compress(data) + c.flush()
    assert qcow.decompress(packed, 4096, 0) == data
    with pytest.raises(CorruptImage, match="inflates to"):
        qcow.decompress(packed, 8192, 0)
    with pytest.raises(CorruptImage):
        qcow.decompress(b"\xff" * 50, 4096, 0)


@given(st.binary(max_size=96), st.integers(0, 1 << 40))
@settings(max_examples=400)
def test_header_parse_or_raise(data: bytes, file_size: int) -> None:
    with contextlib.suppress(QcowlibError):
        qcow.parse_header(data, file_size)


@given(
    st.integers(0, (1 << 64) - 1),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 2),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, 1 << 40),
)
@settings(max_examples=400)
def test_signed_header_parse_or_raise(
    size: int, cluster_bits: int, l2_bits: int, crypt: int, l1: int, file_size: int
) -> None:
    raw = qcow.QCOW_MAGIC + struct.pack(
        ">IQIIQBBHIQ", 1, 0, 0, 0, size, cluster_bits, l2_bits, 0, crypt, l1
    )
    with contextlib.suppress(QcowlibError):
        h = qcow.parse_header(raw, file_size)
        assert h.l1_table_offset + h.l1_size * 8 <= file_size
        assert h.crypt_method == 0


@given(st.lists(st.integers(0, (1 << 64) - 1), min_size=512, max_size=512))
@settings(max_examples=200)
def test_l2_classify_or_raise(entries: list[int]) -> None:
    import numpy as np

    h = qcow.QcowHeader(0, 0, 0, 1 << 30, 12, 9, 0, 48)
    l2 = np.array(entries, dtype=np.uint64)
    with contextlib.suppress(QcowlibError):
        _, host, clen = qcow.classify_l2(h, l2, 4096, 1 << 20)
        assert ((host == -1) | ((host >= 0) & (host < 1 << 20))).all()
        assert (clen < 4096).all()
