"""Bochs growing images: built images read back as qemu-img reads them; hostile files."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcowlib.errors import CorruptImage, FormatError, QcowlibError, TruncatedImage
from qcowlib.formats.bochs import codec as bochs
from qcowlib.formats.detect import probe
from tests.formats.builders import BochsSpec, bochs_expected, build_bochs, patterned_disk
from tests.formats.opaque_oracle import (
    assert_converts,
    assert_reads_like_qemu,
    check_random_reads,
    expect_refused,
    read_all,
    sample,
)

pytestmark = pytest.mark.usefixtures("qemu")

DISK = patterned_disk(300, seed=3, zero_runs=[(16, 48), (200, 40)])

SPECS = {
    "v2-4k": BochsSpec(extent=4096),
    "v1-8k": BochsSpec(extent=8192, version=1, seed=1),
    "v2-64k-big-bitmap": BochsSpec(extent=65536, bitmap=1024, seed=2),
    "partial-bitmaps": BochsSpec(extent=4096, written={0, 1, 9, 10, 11, 150, 299}),
    "spare-catalog": BochsSpec(extent=2048, extra_catalog=7, seed=4),
    "512-byte-extents": BochsSpec(extent=512, bitmap=1, seed=5),
}


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", SPECS)
def test_reads_like_qemu(tmp_path: Path, name: str) -> None:
    spec = SPECS[name]
    path = write(tmp_path, f"{name}.bochs", build_bochs(DISK, spec))
    assert_reads_like_qemu(path, "bochs", bochs_expected(DISK, spec))


def test_odd_disk_size_and_empty_image(tmp_path: Path) -> None:
    image = bytearray(build_bochs(DISK[: 20 * 512], BochsSpec()))
    struct.pack_into("<Q", image, 88, 20 * 512 + 300)  # not a whole number of sectors
    assert_reads_like_qemu(write(tmp_path, "odd.bochs", bytes(image)), "bochs")
    empty = build_bochs(bytes(4096 * 3), BochsSpec())
    assert_reads_like_qemu(write(tmp_path, "empty.bochs", empty), "bochs", bytes(4096 * 3))


def test_convert_and_flatten(tmp_path: Path) -> None:
    path = write(tmp_path, "a.bochs", build_bochs(DISK, SPECS["v2-4k"]))
    assert_converts(path, tmp_path, "bochs")


def test_sample_image_from_qemu() -> None:
    assert_reads_like_qemu(sample("empty.bochs"), "bochs")


def test_probe_is_qemus() -> None:
    image = build_bochs(DISK, BochsSpec())
    assert probe(image[:512], image[-512:], len(image)).format == "bochs"
    for at, value in ((22, b"!"), (39, b"!"), (55, b"!"), (64, b"\x01")):
        bad = image[:at] + value + image[at + 1 :]
        assert probe(bad[:512], bad[-512:], len(bad)).format == "raw"
    # Like QEMU's zero-padded probe buffer: a file cut inside the header is still bochs.
    assert probe(image[:100], image[:100], 100).format == "bochs"


def _poke(image: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(image)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


IMAGE = build_bochs(DISK, BochsSpec(extent=4096))
HOSTILE = {
    "catalog-too-large": (_poke(IMAGE, 72, "<I", 0x100001), CorruptImage),
    "catalog-too-small": (_poke(IMAGE, 72, "<I", 10), CorruptImage),
    "catalog-past-eof": (_poke(IMAGE, 72, "<I", 0xFFFFF), TruncatedImage),
    "extent-zero": (_poke(IMAGE, 80, "<I", 0), CorruptImage),
    "extent-not-power-of-two": (_poke(IMAGE, 80, "<I", 3 * 512), CorruptImage),
    "extent-huge": (_poke(IMAGE, 80, "<I", 1 << 24), CorruptImage),
    "bitmap-zero": (_poke(IMAGE, 76, "<I", 0), CorruptImage),
    "header-offset-huge": (_poke(IMAGE, 68, "<I", 0xFFFFFFF0), CorruptImage),
    "disk-huge": (_poke(IMAGE, 88, "<Q", 1 << 62), CorruptImage),
    "entry-past-eof": (_poke(IMAGE, 512, "<I", 0x7FFFFFF), CorruptImage),
    "version-3": (_poke(IMAGE, 64, "<I", 0x30000), FormatError),
    "truncated-data": (IMAGE[: len(IMAGE) - 3000], CorruptImage),
    "truncated-header": (IMAGE[:300], TruncatedImage),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile(tmp_path: Path, name: str) -> None:
    data, error = HOSTILE[name]
    expect_refused(write(tmp_path, f"{name}.bochs", data), "bochs", error)


@given(st.binary(max_size=600), st.integers(0, 1 << 40))
@settings(max_examples=300)
def test_header_parses_or_raises(data: bytes, size: int) -> None:
    try:
        h = bochs.parse_header(data, size)
    except QcowlibError:
        return
    assert h.data_offset <= size and h.extents_used <= h.catalog <= bochs.BOCHS_CATALOG_MAX


@given(st.lists(st.tuples(st.integers(0, len(IMAGE) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(IMAGE)))  # fmt: skip
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_damaged_image_reads_or_raises(
    tmp_path: Path, pokes: list[tuple[int, int]], cut: int
) -> None:
    image = bytearray(IMAGE[: max(cut, 512)])
    for at, value in pokes:
        if at < len(image):
            image[at] = value
    path = write(tmp_path, "fuzz.bochs", bytes(image))
    with contextlib.suppress(QcowlibError):
        read_all(path, "bochs")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bochs") / "random.bochs"
    path.write_bytes(build_bochs(DISK, SPECS["partial-bitmaps"]))
    return path


@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 70000)), max_size=20))
@settings(max_examples=40, deadline=None)
def test_random_reads(image_file: Path, reads: list[tuple[int, int]]) -> None:
    check_random_reads(image_file, bochs_expected(DISK, SPECS["partial-bitmaps"]), reads)
