"""DMG (UDIF) images: built images read back as qemu-img reads them; hostile files."""

from __future__ import annotations

import bz2
import contextlib
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcowlib.errors import (
    CorruptImage,
    FormatError,
    QcowlibError,
    TruncatedImage,
    UnsupportedFeature,
)
from qcowlib.formats.detect import probe
from qcowlib.formats.dmg import codec as dmg
from qcowlib.formats.dmg.resources import blkx_from_plist, blkx_from_rsrc
from tests.conftest import qemu_img
from tests.formats.builders import (
    UDBZ,
    UDRW,
    UDZE,
    UDZO,
    DmgSpec,
    assemble_dmg,
    build_dmg,
    dmg_expected,
    mish_block,
    patterned_disk,
)
from tests.formats.opaque_oracle import (
    assert_converts,
    assert_reads_like_qemu,
    check_random_reads,
    expect_refused,
    qemu_raw,
    read_all,
    sample,
)

pytestmark = pytest.mark.usefixtures("qemu")

DISK = patterned_disk(400, seed=9, zero_runs=[(40, 60), (250, 30)])
#: Chunk layouts qemu-img 7.2 reads without optional modules (zeros, ignore, raw, zlib).
SPECS = {
    "one-partition": DmgSpec([[("raw", 40), ("zero", 60), ("zlib", 150), ("zlib", 150)]]),
    "partitions": DmgSpec(
        [
            [("raw", 1)],
            [("zlib", 39), ("comment", 0), ("ignore", 60)],
            [("zlib", 90), ("raw", 60), ("zero", 30), ("zlib", 120)],
        ]
    ),
    "resource-fork": DmgSpec([[("zlib", 40)], [("zero", 60), ("raw", 300)]], rsrc=True),
    "absolute-offsets": DmgSpec([[("raw", 100)], [("zlib", 300)]], relative_data=False),
    "big-zlib-chunk": DmgSpec([[("zlib", 400)]]),
}


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", SPECS)
def test_reads_like_qemu(tmp_path: Path, name: str) -> None:
    spec = SPECS[name]
    path = write(tmp_path, f"{name}.dmg", build_dmg(DISK, spec))
    assert_reads_like_qemu(path, "dmg", dmg_expected(DISK, spec))


def test_convert_and_flatten(tmp_path: Path) -> None:
    path = write(tmp_path, "a.dmg", build_dmg(DISK, SPECS["partitions"]))
    assert_converts(path, tmp_path, "dmg")


def test_sample_image_from_qemu() -> None:
    assert_reads_like_qemu(sample("simple-dmg.dmg"), "dmg")


def _qemu_reads_bzip2(tmp_path: Path) -> bool:
    path = write(tmp_path, "probe-bz2.dmg", build_dmg(DISK[:512], DmgSpec([[("bzip2", 1)]])))
    out = tmp_path / "probe-bz2.raw"
    return qemu_img("convert", "-f", "dmg", "-O", "raw", path, out, check=False).returncode == 0


def test_bzip2_chunks(tmp_path: Path) -> None:
    """bzip2 chunks read with the stdlib; qemu-img reads them only with its dmg-bz2
    module (Debian's qemu-utils 7.2 has none), so it judges only where it can."""
    spec = DmgSpec([[("bzip2", 100), ("zero", 40), ("bzip2", 260)]])
    path = write(tmp_path, "bz.dmg", build_dmg(DISK, spec))
    fmt, ours = read_all(path)
    assert (fmt, ours) == ("dmg", dmg_expected(DISK, spec))
    if _qemu_reads_bzip2(tmp_path):
        assert ours == qemu_raw(path, "dmg")


@pytest.mark.parametrize(("kind", "name"), [("adc", "ADC"), ("lzfse", "LZFSE")])
def test_unsupported_chunks_are_named(tmp_path: Path, kind: str, name: str) -> None:
    """info and map work as in qemu-img; reading the chunk fails naming its type (qemu-img
    fails too: 7.2 has no ADC decoder, LZFSE needs a module)."""
    spec = DmgSpec([[("raw", 100), (kind, 50), ("zlib", 250)]])
    path = write(tmp_path, f"{kind}.dmg", build_dmg(DISK, spec))
    with pytest.raises(UnsupportedFeature, match=name):
        read_all(path)
    out = tmp_path / "x.raw"
    assert qemu_img("convert", "-f", "dmg", "-O", "raw", path, out, check=False).returncode != 0
    from qcowlib.formats.opener import open_disk

    with open_disk(str(path)) as disk:
        assert disk.read(0, 100 * 512) == DISK[: 100 * 512]
        assert disk.read(150 * 512, 250 * 512) == DISK[150 * 512 :]
    expect_refused(path, "dmg", UnsupportedFeature)


def test_sector_without_chunk_fails_like_qemu(tmp_path: Path) -> None:
    fork = DISK[: 10 * 512]
    mish = mish_block(0, 20, 0, [(UDRW, 0, 10, 0, len(fork))])
    path = write(tmp_path, "gap.dmg", assemble_dmg(fork, [mish], 20))
    out = tmp_path / "x.raw"
    assert qemu_img("convert", "-f", "dmg", "-O", "raw", path, out, check=False).returncode != 0
    assert "sector 10" in expect_refused(path, "dmg", CorruptImage)


def test_probe_by_trailer_not_name(tmp_path: Path) -> None:
    image = build_dmg(DISK, SPECS["one-partition"])
    assert probe(image[:65536], image[-512:], len(image)).format == "dmg"
    path = write(tmp_path, "named-otherwise.img", image)
    assert read_all(path)[0] == "dmg"
    assert probe(image[:-1], image[-513:-1], len(image) - 1).format == "raw"
    named = write(tmp_path, "plain.dmg", DISK)
    assert read_all(named)[0] == "raw"


def _koly_poke(image: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(image)
    struct.pack_into(fmt, out, len(out) - 512 + at, value)
    return bytes(out)


IMAGE = build_dmg(DISK, SPECS["partitions"])


def _table(*chunks: tuple[int, int, int, int, int], sectors: int = 400, fork: bytes = b"") -> bytes:
    fork = fork or DISK[: 10 * 512]
    return assemble_dmg(fork, [mish_block(0, sectors, 0, list(chunks))], sectors)


BOMB = zlib.compress(bytes(64 << 20), 9)
HOSTILE = {
    "no-trailer": (IMAGE[:-512] + bytes(512), FormatError),
    "tiny": (b"koly" + bytes(100), TruncatedImage),
    "data-fork-after-koly": (_koly_poke(IMAGE, 0x18, ">Q", 1 << 40), CorruptImage),
    "xml-past-koly": (_koly_poke(IMAGE, 0xE0, ">Q", 1 << 40), CorruptImage),
    "xml-offset-past-koly": (_koly_poke(IMAGE, 0xD8, ">Q", len(IMAGE)), CorruptImage),
    "no-xml-no-rsrc": (_koly_poke(IMAGE, 0xE0, ">Q", 0), CorruptImage),
    "sector-count-huge": (_koly_poke(IMAGE, 0x1EC, ">Q", 1 << 62), CorruptImage),
    "xml-garbage": (_koly_poke(IMAGE, 0xD8, ">Q", 0), CorruptImage),
    "chunk-length-huge": (_table((UDZO, 0, 1, 0, 65 << 20)), CorruptImage),
    "chunk-count-huge": (_table((UDZO, 0, (64 << 11) + 1, 0, 10)), CorruptImage),
    "chunk-past-eof": (_table((UDRW, 0, 10, 1 << 40, 5120)), CorruptImage),
    "chunk-offset-wraps": (_table((UDRW, 0, 10, 2**64 - 100, 5120)), CorruptImage),
    "chunks-overlap": (_table((UDRW, 0, 10, 0, 5120), (UDZE, 5, 10, 0, 0)), CorruptImage),
    "raw-chunk-short": (_table((UDRW, 0, 10, 0, 100)), CorruptImage),
    "zlib-bomb": (_table((UDZO, 0, 1, 0, len(BOMB)), fork=BOMB), CorruptImage),
    "bzip2-bomb": (
        _table((UDBZ, 0, 1, 0, 1000), fork=bz2.compress(bytes(1 << 20))[:1000].ljust(1000, b"\0")),
        CorruptImage,
    ),
    "zlib-garbage": (_table((UDZO, 0, 10, 0, 5120)), CorruptImage),
    "truncated": (IMAGE[: len(IMAGE) // 2], FormatError),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile(tmp_path: Path, name: str) -> None:
    data, error = HOSTILE[name]
    expect_refused(write(tmp_path, f"{name}.dmg", data), "dmg", error)


def test_entity_declarations_are_refused() -> None:
    xml = (
        b'<?xml version="1.0"?><!DOCTYPE plist [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><plist><string>&b;</string></plist>'
    )
    with pytest.raises(CorruptImage):
        blkx_from_plist(xml)


def test_resource_fork_checks() -> None:
    mish = mish_block(0, 1, 0, [(UDZE, 0, 1, 0, 0)])
    fork = struct.pack(">IIII", 16, 0, 4 + len(mish), 0) + struct.pack(">I", len(mish)) + mish
    assert blkx_from_rsrc(fork, 0) == [mish]
    for bad in (
        fork[:10],
        struct.pack(">IIII", 16, 0, 0, 0) + fork[16:],
        struct.pack(">IIII", 16, 0, 4 + len(mish) + 1, 0) + fork[16:],
        fork[:16] + struct.pack(">I", len(mish) + 1) + mish,
        fork[:16] + struct.pack(">I", 0) + mish,
    ):
        with pytest.raises(CorruptImage):
            blkx_from_rsrc(bad, 0)


@given(st.binary(max_size=2000))
@settings(max_examples=300)
def test_plist_parses_or_raises(data: bytes) -> None:
    with contextlib.suppress(QcowlibError):
        assert all(isinstance(b, bytes) for b in blkx_from_plist(data))


@given(st.binary(max_size=600))
@settings(max_examples=300)
def test_resource_fork_parses_or_raises(data: bytes) -> None:
    with contextlib.suppress(QcowlibError):
        assert sum(len(b) + 4 for b in blkx_from_rsrc(data, 0)) <= len(data)


@given(
    st.lists(st.tuples(st.binary(min_size=200, max_size=700), st.integers(0, 1 << 64)), max_size=3),
    st.integers(0, 1 << 40),
    st.integers(0, 1 << 20),
)
@settings(max_examples=300, deadline=None)
def test_chunk_table_builds_or_raises(
    bodies: list[tuple[bytes, int]], sectors: int, size: int
) -> None:
    mishes = [dmg.decode_mish(b"mish" + body, i, fork) for i, (body, fork) in enumerate(bodies)]
    koly = dmg.Koly(size, 0, 0, 0, 0, 1, sectors)
    try:
        table = dmg.build_table([m for m in mishes if m is not None], koly, size)
    except QcowlibError:
        return
    data = (table.offset >= 0) & (table.type != dmg.UDCO) & (table.type != dmg.ULFO)
    assert ((table.offset + table.length)[data] <= size).all()
    assert (table.sector + table.sectors <= sectors).all()
    assert (table.sector[1:] >= (table.sector + table.sectors)[:-1]).all()


@given(st.lists(st.tuples(st.integers(0, len(IMAGE) - 1), st.integers(0, 255)), max_size=8))
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_damaged_image_reads_or_raises(tmp_path: Path, pokes: list[tuple[int, int]]) -> None:
    image = bytearray(IMAGE)
    for at, value in pokes:
        image[at] = value
    with contextlib.suppress(QcowlibError):
        read_all(write(tmp_path, "fuzz.dmg", bytes(image)), "dmg")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dmg") / "random.dmg"
    path.write_bytes(build_dmg(DISK, SPECS["partitions"]))
    return path


@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 70000)), max_size=20))
@settings(max_examples=40, deadline=None)
def test_random_reads(image_file: Path, reads: list[tuple[int, int]]) -> None:
    check_random_reads(image_file, dmg_expected(DISK, SPECS["partitions"]), reads)


@pytest.mark.parametrize(
    "body",
    [
        b"<dict><key>Data</key><data></data></dict>" * 300_000,  # blkx-looking entries
        b"<array>" * 1_000_000 + b"</array>" * 1_000_000,  # nesting
        b"<true/>" * 1_000_000,
    ],
    ids=["entries", "nesting", "elements"],
)
def test_a_property_list_of_millions_of_elements_is_refused_before_parsing(
    body: bytes,
) -> None:
    """Within the 16 MiB cap, a property list of small elements made plistlib build an
    object each: 600 MB and 1-2 s per open (per command) for a 14 MB file."""
    import resource
    import time

    xml = b'<?xml version="1.0"?><plist version="1.0"><array>' + body + b"</array></plist>"
    assert len(xml) < 16 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    with pytest.raises(CorruptImage, match="elements"):
        blkx_from_plist(xml)
    assert time.monotonic() - t0 < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 << 10  # KiB


def test_a_resource_fork_of_millions_of_resources_is_refused() -> None:
    res = (struct.pack(">I", 1) + b"x") * 3_000_000
    fork = struct.pack(">IIII", 16, 0, len(res), 0) + res
    with pytest.raises(CorruptImage, match="resources"):
        blkx_from_rsrc(fork, 0)
