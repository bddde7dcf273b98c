"""Parallels images against qemu-img: reads, ``info``, ``map`` and ``check`` (with
repair) as qemu-img 7.2 gives them, both magics, the in-use flag, the Format Extension
with a dirty bitmap, hostile headers and BATs, and the codecs on arbitrary bytes.

QEMU's own sample images (``tests/qemu-iotests/sample_images/parallels-*.bz2`` in the
QEMU source) are used when ``QCOWLIB_QEMU_SAMPLES`` names that folder (or a QEMU 7.2
source tree is unpacked under ``~/.cache/qcowlib-qemu-src``); they are never required.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowlib.errors import QcowlibError
from qcowlib.formats.parallels import codec as prl
from tests.conftest import qemu_img, qemu_io
from tests.formats.oracle import (
    assert_check_like_qemu,
    assert_converts_to_qcow2,
    assert_info_and_map_like_qemu,
    assert_reads_like_qemu,
    assert_refused,
    poke,
)

pytestmark = pytest.mark.usefixtures("qemu")

WRITES = (
    "write -P 0x11 0 100k",
    "write -P 0x22 5m 4k",
    "write -z 8m 1m",
    "write -P 0x33 3000k 70k",
    "discard 5m 4k",
)


def make_prl(path: Path, *opts: str, size: str = "10M") -> Path:
    qemu_img("create", "-q", "-f", "parallels", *opts, path, size)
    qemu_io(path, "parallels", *WRITES)
    return path


@pytest.mark.parametrize("cluster", ["1M", "64k", "4k"])
def test_reads_info_map_check_like_qemu(tmp_path: Path, cluster: str) -> None:
    p = make_prl(tmp_path / "a.hds", "-o", f"cluster_size={cluster}")
    assert_reads_like_qemu(p, tmp_path)
    assert_info_and_map_like_qemu(p)
    assert_check_like_qemu(p, tmp_path)
    assert_converts_to_qcow2(p, tmp_path)


def to_v1(path: Path) -> None:
    """Rewrite a "WithouFreSpacExt" image as "WithoutFreeSpace" (BAT in sectors)."""
    data = bytearray(path.read_bytes())
    tracks, entries = struct.unpack_from("<II", data, 28)
    data[:16] = prl.HEADER_MAGIC
    for i in range(entries):
        (e,) = struct.unpack_from("<I", data, 64 + 4 * i)
        struct.pack_into("<I", data, 64 + 4 * i, e * tracks)
    path.write_bytes(bytes(data))


def test_without_free_space_magic(tmp_path: Path) -> None:
    p = make_prl(tmp_path / "v1.hds", "-o", "cluster_size=64k")
    to_v1(p)
    poke(p, 40, struct.pack("<I", 0xFFFF))  # high half of nb_sectors: ignored for v1
    assert_reads_like_qemu(p, tmp_path)
    assert_info_and_map_like_qemu(p)
    assert_check_like_qemu(p, tmp_path)


def corrupt(p: Path) -> None:
    poke(p, 44, struct.pack("<I", prl.HEADER_INUSE_MAGIC))  # not closed cleanly
    poke(p, 64 + 4 * 7, struct.pack("<I", 50))  # a cluster far past the end
    with p.open("ab") as f:
        f.write(b"x" * 1_500_000)  # leaked space, not a whole number of sectors


@pytest.mark.parametrize("repair", [None, "leaks", "all"])
def test_check_and_repair_of_a_damaged_image(tmp_path: Path, repair: str | None) -> None:
    p = make_prl(tmp_path / "bad.hds")
    corrupt(p)
    assert_check_like_qemu(p, tmp_path, repair=repair)


def test_unclean_image_reads(tmp_path: Path) -> None:
    p = make_prl(tmp_path / "inuse.hds")
    poke(p, 44, struct.pack("<I", prl.HEADER_INUSE_MAGIC))
    assert_reads_like_qemu(p, tmp_path)
    assert_info_and_map_like_qemu(p)
    assert_check_like_qemu(p, tmp_path, repair="all")


def extension(h: prl.ParallelsHeader, features: bytes) -> bytes:
    """A Format Extension cluster holding ``features`` (then End of features)."""
    body = features + bytes(16 + 8)
    body = body.ljust(h.cluster_size - 24, b"\0")
    return struct.pack("<Q", 0xAB234CEF23DCEA87) + hashlib.md5(body).digest() + body


def bitmap_feature(h: prl.ParallelsHeader, l1: list[int], size: int | None = None) -> bytes:
    data = struct.pack("<Q16sII", size or h.total_sectors, bytes(range(16)), 128, len(l1))
    data += b"".join(struct.pack("<Q", e) for e in l1)
    return struct.pack("<QQII", 0x20385FAE252CB34A, 0, len(data), 0) + data


def with_extension(tmp_path: Path, features: bytes) -> Path:
    p = make_prl(tmp_path / "ext.hds", "-o", "cluster_size=64k")
    h = prl.parse_header(p.read_bytes()[:64], p.stat().st_size)
    at = p.stat().st_size
    with p.open("ab") as f:
        f.write(extension(h, features))
    poke(p, 56, struct.pack("<Q", at // 512))
    return p


def test_format_extension_with_a_dirty_bitmap(tmp_path: Path) -> None:
    p = with_extension(tmp_path, bitmap_feature(parse(tmp_path), [1]))
    assert_reads_like_qemu(p, tmp_path)
    assert_info_and_map_like_qemu(p)
    assert_check_like_qemu(p, tmp_path)


def parse(tmp_path: Path) -> prl.ParallelsHeader:
    p = make_prl(tmp_path / "probe.hds", "-o", "cluster_size=64k")
    return prl.parse_header(p.read_bytes()[:64], p.stat().st_size)


@pytest.mark.parametrize(
    ("features", "words"),
    [
        (struct.pack("<QQII", 0x1234, 0, 0, 0), "unknown Parallels Format Extension feature"),
        (struct.pack("<QQII", 0x20385FAE252CB34A, 1, 0, 0), "feature flags"),
        (struct.pack("<QQII", 0x20385FAE252CB34A, 0, 1 << 20, 0), "data_size"),
    ],
)
def test_format_extension_problems_are_refused_as_qemu(
    tmp_path: Path, features: bytes, words: str
) -> None:
    p = with_extension(tmp_path, features)
    assert qemu_img("info", p, check=False).returncode == 1
    assert_refused(p, words)


def test_bad_bitmap_and_checksum_are_refused(tmp_path: Path) -> None:
    h = parse(tmp_path)
    p = with_extension(tmp_path, bitmap_feature(h, [1], size=h.total_sectors + 1))
    assert qemu_img("info", p, check=False).returncode == 1
    assert_refused(p, "bitmap size")
    q = with_extension(tmp_path, bitmap_feature(h, [1, 1, 1]))
    assert qemu_img("info", q, check=False).returncode == 1
    assert_refused(q, "bitmap table size")
    poke(q, q.stat().st_size - 100, b"\1")
    assert_refused(q, "checksum")


HEADER_POKES = [
    (28, "<I", 0, "zero sectors per track"),
    (28, "<I", 0x7FFFFFFF, "too big cluster"),
    (32, "<I", 0x7FFFFFFF, "catalog too large"),
    (32, "<I", 0x10000000, "past the end of the file"),  # BAT outside the file
    (36, "<Q", 1 << 62, "image too large"),
]


@pytest.mark.parametrize(("at", "fmt", "value", "words"), HEADER_POKES)
def test_hostile_headers_are_refused(
    tmp_path: Path, at: int, fmt: str, value: int, words: str
) -> None:
    p = make_prl(tmp_path / "h.hds")
    poke(p, at, struct.pack(fmt, value))
    assert_refused(p, words)


def test_cluster_outside_the_file_is_refused_when_read(tmp_path: Path) -> None:
    p = make_prl(tmp_path / "out.hds")
    poke(p, 64 + 4 * 3, struct.pack("<I", 1000))
    assert_refused(p, "outside the image", "entry[3]")


# -- QEMU's sample images (optional) ------------------------------------------------------


def _samples() -> Path | None:
    env = os.environ.get("QCOWLIB_QEMU_SAMPLES")
    default = Path.home() / ".cache/qcowlib-qemu-src/qemu-7.2.0/tests/qemu-iotests/sample_images"
    for folder in (Path(env) if env else None, default):
        if folder is not None and (folder / "parallels-v1.bz2").is_file():
            return folder
    return None


@pytest.mark.parametrize("name", ["parallels-v1", "parallels-v2", "parallels-with-bitmap"])
def test_qemu_sample_images(tmp_path: Path, name: str) -> None:
    folder = _samples()
    if folder is None:
        pytest.skip("QEMU's sample images are not available (QCOWLIB_QEMU_SAMPLES)")
    p = tmp_path / f"{name}.hds"
    p.write_bytes(bz2.decompress((folder / f"{name}.bz2").read_bytes()))
    assert_info_and_map_like_qemu(p)
    assert_check_like_qemu(p, tmp_path)
    assert_converts_to_qcow2(p, tmp_path)  # 64 GiB for the bitmap one: not read whole


# -- codecs ----------------------------------------------------------------------------------


@given(st.binary(max_size=128), st.integers(0, 1 << 40))
@settings(max_examples=400)
def test_header_parse_or_raise(data: bytes, file_size: int) -> None:
    with contextlib.suppress(QcowlibError):
        prl.parse_header(data, file_size)


@given(
    st.sampled_from([prl.HEADER_MAGIC, prl.HEADER_MAGIC2]),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, 1 << 40),
)
@settings(max_examples=400)
def test_signed_header_parse_or_raise(
    magic: bytes, tracks: int, entries: int, sectors: int, file_size: int
) -> None:
    raw = magic + struct.pack("<IIIIIQIIIQ", 2, 16, 0, tracks, entries, sectors, 0, 0, 0, 0)
    with contextlib.suppress(QcowlibError):
        h = prl.parse_header(raw, file_size)
        assert prl.HEADER_SIZE + h.bat_bytes <= file_size
        assert h.cluster_size > 0 and h.virtual_size < 1 << 63


@given(st.binary(min_size=0, max_size=65536))
@settings(max_examples=200)
def test_extension_parse_or_raise(data: bytes) -> None:
    raw = struct.pack("<16sIIIIIQIIIQ", prl.HEADER_MAGIC2, 2, 16, 0, 128, 10, 10240, 0, 0, 0, 0)
    h = prl.parse_header(raw, 1 << 20)
    cluster = data.ljust(h.cluster_size, b"\0")
    with contextlib.suppress(QcowlibError):
        prl.parse_extension(cluster, h, 0)
    # With a right magic and checksum, the feature walk is reached.
    body = cluster[24:]
    signed = struct.pack("<Q", 0xAB234CEF23DCEA87) + hashlib.md5(body).digest() + body
    with contextlib.suppress(QcowlibError):
        prl.parse_extension(signed, h, 0)
