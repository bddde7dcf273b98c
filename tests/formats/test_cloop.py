"""cloop images: built images read back as qemu-img reads them; hostile files and bombs."""

from __future__ import annotations

import contextlib
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcowlib.core.hostfile import HostFile
from qcowlib.errors import CorruptImage, FormatError, QcowlibError, TruncatedImage
from qcowlib.formats._inflate import inflate_bzip2, inflate_zlib
from qcowlib.formats.cloop import codec as cloop
from qcowlib.formats.cloop.reader import CloopDisk
from qcowlib.formats.detect import probe
from tests.formats.builders import CLOOP_MAGIC, build_cloop, patterned_disk
from tests.formats.opaque_oracle import (
    assert_converts,
    assert_reads_like_qemu,
    check_random_reads,
    expect_refused,
    read_all,
    sample,
)

pytestmark = pytest.mark.usefixtures("qemu")

DISK = patterned_disk(512, seed=5, zero_runs=[(100, 150)])


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("block_size", "level"), [(512, 6), (16384, 1), (65536, 9), (262144, 0)])
def test_reads_like_qemu(tmp_path: Path, block_size: int, level: int) -> None:
    path = write(tmp_path, "a.cloop", build_cloop(DISK, block_size, level))
    assert_reads_like_qemu(path, "cloop", DISK)


def test_no_blocks(tmp_path: Path) -> None:
    assert_reads_like_qemu(write(tmp_path, "empty.cloop", build_cloop(b"", 4096)), "cloop", b"")


def test_convert_and_flatten(tmp_path: Path) -> None:
    path = write(tmp_path, "a.cloop", build_cloop(DISK, 16384))
    assert_converts(path, tmp_path, "cloop")


def test_sample_image_from_qemu() -> None:
    assert_reads_like_qemu(sample("simple-pattern.cloop"), "cloop")


def test_probe_needs_the_whole_magic() -> None:
    image = build_cloop(DISK, 65536)
    assert probe(image[:4096], image[-512:], len(image)).format == "cloop"
    short = CLOOP_MAGIC[:-1]
    assert probe(short, short, len(short)).format == "raw"
    other = CLOOP_MAGIC.replace(b"V2.0", b"V3.0")
    assert probe(other, other, len(other)).format == "raw"


def _poke(image: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(image)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


IMAGE = build_cloop(DISK, 16384)
N = len(DISK) // 16384
HOSTILE = {
    "block-size-odd": (_poke(IMAGE, 128, ">I", 1000), CorruptImage),
    "block-size-zero": (_poke(IMAGE, 128, ">I", 0), CorruptImage),
    "block-size-huge": (_poke(IMAGE, 128, ">I", 128 << 20), CorruptImage),
    "block-size-larger": (_poke(IMAGE, 128, ">I", 32768), CorruptImage),
    "n-blocks-huge": (_poke(IMAGE, 132, ">I", 0xFFFFFFF0), CorruptImage),
    "offsets-past-eof-table": (_poke(IMAGE, 132, ">I", 1 << 20), TruncatedImage),
    "offset-past-eof": (_poke(IMAGE, 136 + 8 * 3, ">Q", 1 << 40), CorruptImage),
    "offset-decreasing": (_poke(IMAGE, 136 + 8 * 3, ">Q", 10), CorruptImage),
    "offset-last-wraps": (_poke(IMAGE, 136 + 8 * N, ">Q", 2**64 - 1), CorruptImage),
    "truncated-blocks": (IMAGE[:-2000], CorruptImage),
    "bad-stream": (
        IMAGE[: 136 + 8 * (N + 1)] + b"\x78\x9c" + b"\xff" * 20 + IMAGE[136 + 8 * (N + 1) + 22 :],
        CorruptImage,
    ),
    "bad-magic": (b"X" + IMAGE[1:], FormatError),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile(tmp_path: Path, name: str) -> None:
    data, error = HOSTILE[name]
    expect_refused(write(tmp_path, f"{name}.cloop", data), "cloop", error)


def test_decompression_bomb_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    """A block that inflates to 64 MiB where 64 KiB are declared: refused, and reading
    it never holds more than about one block."""
    block = 65536
    bomb = zlib.compress(bytes(64 << 20), 9)
    head = CLOOP_MAGIC.ljust(128, b"\0") + struct.pack(">II", block, 1)
    start = 136 + 16
    image = head + struct.pack(">QQ", start, start + len(bomb)) + bomb
    path = write(tmp_path, "bomb.cloop", image)
    disk = CloopDisk(HostFile(str(path)), str(path))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptImage, match="more than the 65536 bytes"):
            disk.read(0, block)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        disk.close()
    assert peak < 4 * block + 2 * len(bomb)
    expect_refused(path, "cloop", CorruptImage)


def test_short_block_is_refused() -> None:
    with pytest.raises(CorruptImage, match="inflates to 100 bytes"):
        inflate_zlib(zlib.compress(bytes(100)), 512, "block", 0)
    with pytest.raises(CorruptImage, match="truncated"):
        inflate_zlib(zlib.compress(bytes(4096))[:-6], 4096, "block", 0)
    assert inflate_zlib(zlib.compress(b"") + b"junk", 0, "block", 0) == b""


@given(
    st.binary(max_size=300), st.integers(0, 1000), st.sampled_from([inflate_zlib, inflate_bzip2])
)
@settings(max_examples=300)
def test_inflate_returns_exact_size_or_raises(data: bytes, size: int, inflate: object) -> None:
    try:
        out = inflate(data, size, "block", 0)  # type: ignore[operator]
    except QcowlibError:
        return
    assert len(out) == size


@given(st.binary(max_size=400), st.integers(0, 1 << 40))
@settings(max_examples=300)
def test_header_parses_or_raises(data: bytes, size: int) -> None:
    data = CLOOP_MAGIC.ljust(128, b"\0") + data
    try:
        h = cloop.parse_header(data, size)
    except QcowlibError:
        return
    assert 0 < h.block_size <= cloop.MAX_BLOCK_SIZE
    assert cloop.OFFSETS_AT + h.offsets_size <= size


@given(st.lists(st.tuples(st.integers(128, len(IMAGE) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(IMAGE)))  # fmt: skip
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_damaged_image_reads_or_raises(
    tmp_path: Path, pokes: list[tuple[int, int]], cut: int
) -> None:
    image = bytearray(IMAGE[: max(cut, 128)])
    for at, value in pokes:
        if at < len(image):
            image[at] = value
    with contextlib.suppress(QcowlibError):
        read_all(write(tmp_path, "fuzz.cloop", bytes(image)), "cloop")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cloop") / "random.cloop"
    path.write_bytes(build_cloop(DISK, 16384))
    return path


@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 70000)), max_size=20))
@settings(max_examples=40, deadline=None)
def test_random_reads(image_file: Path, reads: list[tuple[int, int]]) -> None:
    check_random_reads(image_file, DISK, reads)
