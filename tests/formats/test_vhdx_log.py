"""VHDX log replay against qemu-img's: crafted dirty logs on images qemu-img made, and
QEMU's own Hyper-V sample (``iotest-dirtylog-10G-4M.vhdx``, skipped without it).

Each dirty image is copied twice: ``qemu-img check -r all`` replays one copy and
``qcowlib check -r all`` the other.  Both print the same and exit the same, and the
files end byte for byte the same except for the two 4 KiB headers, where QEMU and
qcowlib each write a random file write GUID (per session) and data write GUID (per
header update): there the sequence numbers, log GUID (zero), log fields and every other
byte agree.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qcowlib.core.hostfile import HostFile
from qcowlib.errors import CorruptImage, UnsupportedFeature
from qcowlib.formats.vhdx import log as vhdx_log
from qcowlib.formats.vhdx.reader import VhdxDisk
from tests.conftest import cli, qemu_img, qemu_io
from tests.formats.opaque_oracle import sample
from tests.formats.vhdx_log_builder import (
    HEADER_OFFSETS,
    MIB,
    SECTOR,
    Data,
    Zero,
    entry,
    header_fields,
    make_dirty,
    sector,
    set_log_guid,
)

pytestmark = pytest.mark.usefixtures("qemu")

BAT = 2 * MIB  # where qemu-img puts the BAT of the image below
BLOCK0 = 8 * MIB  # guest block 0 (written first)
BLOCK3 = 9 * MIB  # guest block 3
EOF = 10 * MIB
LOG_LENGTH = MIB


def base_image(tmp: Path) -> Path:
    """An 8 MiB dynamic VHDX with 1 MiB blocks; blocks 0 and 3 hold data."""
    p = tmp / "base.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", p, "8M")
    qemu_io(p, "vhdx", "write -P 0x11 0 1M", "write -P 0x22 3M 512k")
    assert p.stat().st_size == EOF
    return p


def _bat_sector(p: Path, block: int, host: int) -> bytes:
    """The first BAT sector with ``block`` mapped FULLY_PRESENT at ``host``."""
    raw = bytearray(p.read_bytes()[BAT : BAT + SECTOR])
    raw[8 * block : 8 * block + 8] = struct.pack("<Q", host | 6)
    return bytes(raw)


def _three(p: Path, first: int = 100) -> list[bytes]:
    """Three consecutive entries: a new block 5 at the end of the file (BAT update, two
    data sectors, a zero range, and a last_file_offset that grows the file), then
    writes into blocks 0 and 3."""
    a = entry(
        first,
        [
            Data(BAT, _bat_sector(p, 5, EOF)),
            Data(EOF, sector(0x33, b"AB")),
            Data(EOF + SECTOR, sector(0x34, b"CDEF")),
            Zero(EOF + 2 * SECTOR, 14 * SECTOR),
        ],
        flushed=EOF,
        last=EOF + MIB - 512,
    )
    b = entry(
        first + 1,
        [Data(BLOCK0 + SECTOR, sector(0x55, b"xy")), Zero(BLOCK0 + 64 * 1024, 64 * 1024)],
        flushed=EOF,
        last=EOF,
    )
    c = entry(first + 2, [Data(BLOCK3, sector(0x66)), Zero(BLOCK3 + 128 * 1024, SECTOR)],
              flushed=EOF, last=EOF)  # fmt: skip
    return [a, b, c]


def _at(pos: int, entries: list[bytes]) -> list[tuple[int, bytes]]:
    out = []
    for e in entries:
        out.append((pos, e))
        pos += len(e)
    return out


def _single(p: Path) -> list[tuple[int, bytes]]:
    return _at(0, _three(p)[:1])


def _several(p: Path) -> list[tuple[int, bytes]]:
    return _at(5 * SECTOR, _three(p))


def _wrapping(p: Path) -> list[tuple[int, bytes]]:
    """A sequence whose first entry wraps around the end of the log.  QEMU's search
    meets the second entry first (at the log's start) and prefers the sequence that
    starts there, whose first number is higher: only the last two entries are
    replayed, by QEMU and so by qcowlib."""
    return _at(LOG_LENGTH - 2 * SECTOR, _three(p))


def _wrapped_entry(p: Path) -> list[tuple[int, bytes]]:
    """A lone entry that wraps around the end of the log: replayed whole."""
    return _at(LOG_LENGTH - 2 * SECTOR, _three(p)[:1])


def _torn(p: Path) -> list[tuple[int, bytes]]:
    """Two good entries, then a third with a bad checksum (a torn write)."""
    a, b, _ = _three(p)
    c = entry(102, [Data(BLOCK3, sector(0x77))], flushed=EOF, last=EOF, bad_crc=True)
    return _at(0, [a, b, c])


def _gap(p: Path) -> list[tuple[int, bytes]]:
    """An older sequence (1, 2) and, after a gap in the numbers, the active one."""
    old = [entry(1, [Data(BLOCK0, sector(0x99))], flushed=EOF, last=EOF),
           entry(2, [Zero(BLOCK0, MIB)], flushed=EOF, last=EOF)]  # fmt: skip
    return _at(0, old) + _at(64 * SECTOR, _three(p, first=40))


def _newer_first(p: Path) -> list[tuple[int, bytes]]:
    """A sequence after the active one whose numbers are lower (the log wrapped)."""
    stale = [entry(7, [Data(BLOCK0, sector(0x98))], flushed=EOF, last=EOF)]
    return _at(0, _three(p, first=500)) + _at(40 * SECTOR, stale)


def _guid_only(p: Path) -> list[tuple[int, bytes]]:
    """A log GUID, but no valid entry (an entry of another log GUID)."""
    return [(0, entry(9, [Data(BLOCK0, sector(0x44))], flushed=EOF, last=EOF, guid=b"x" * 16))]


def _oversized(p: Path) -> list[tuple[int, bytes]]:
    """An entry that says it is longer than the whole log: not an entry."""
    raw = entry(9, [Data(BLOCK0, sector(0x44))], flushed=EOF, last=EOF, entry_length=2 * MIB)
    return [(0, raw)]


def _count_overflow(p: Path) -> list[tuple[int, bytes]]:
    """A descriptor count whose descriptors could not fit the entry: not an entry."""
    raw = entry(9, [Data(BLOCK0, sector(0x44))], flushed=EOF, last=EOF, count=0xFFFFFFFF)
    return [(0, raw)]


def _aligned_last(p: Path) -> list[tuple[int, bytes]]:
    """A last_file_offset past the end that is a multiple of 1 MiB: QEMU does not grow
    the file to it (only an unaligned one is rounded up and grown to)."""
    raw = entry(5, [Data(EOF, sector(0x21))], flushed=EOF, last=EOF + 2 * MIB)
    return [(0, raw)]


def _cut_below_write(p: Path) -> list[tuple[int, bytes]]:
    """A write past the size the entry's last_file_offset rounds to: QEMU writes it,
    then sets the file's length, cutting the write off."""
    raw = entry(5, [Data(EOF + MIB + 2 * SECTOR, sector(0x21))], flushed=EOF, last=EOF + 512)
    return [(0, raw)]


SCENARIOS: dict[str, Callable[[Path], list[tuple[int, bytes]]]] = {
    "single": _single,
    "several": _several,
    "wrapping": _wrapping,
    "wrapped-entry": _wrapped_entry,
    "torn": _torn,
    "gap": _gap,
    "newer-first": _newer_first,
    "aligned-last-offset": _aligned_last,
    "cut-below-write": _cut_below_write,
    "guid-only": _guid_only,
    "oversized-entry": _oversized,
    "count-overflow": _count_overflow,
}


def _check_both(src: Path, tmp: Path, output: str, *args: str) -> tuple[Path, Path]:
    """``check -r all`` by qemu-img and by qcowlib on copies of ``src``: same output
    and exit status; returns (ours, theirs)."""
    ours, theirs = tmp / f"ours-{output}.vhdx", tmp / f"qemu-{output}.vhdx"
    shutil.copyfile(src, ours)
    shutil.copyfile(src, theirs)
    got = cli("check", *args, "--output", output, ours)
    want = qemu_img("check", *args, f"--output={output}", theirs, check=False)
    assert got.returncode == want.returncode, (got.stderr, want.stderr)
    if output == "json":
        a, b = json.loads(got.stdout), json.loads(want.stdout)
        a["filename"] = b["filename"]
        assert list(a.items()) == list(b.items())
    else:
        assert got.stdout == want.stdout
    assert got.stderr == want.stderr
    return ours, theirs


def assert_same_replay(ours: Path, theirs: Path) -> None:
    """Byte for byte the same, but for the GUIDs each replay makes up (see above)."""
    a, b = ours.read_bytes(), theirs.read_bytes()
    assert len(a) == len(b)
    for at in HEADER_OFFSETS:
        a = a[:at] + bytes(SECTOR) + a[at + SECTOR :]
        b = b[:at] + bytes(SECTOR) + b[at + SECTOR :]
    assert a == b
    mine, qemus = header_fields(ours), header_fields(theirs)
    for h in (mine, qemus):
        assert h[0][3] == h[1][3]  # one file write GUID for the session
    for m, q in zip(mine, qemus, strict=True):
        assert (m[0], m[2], m[5:]) == (q[0], q[2], q[5:])
    data = [ours.read_bytes()[at + 80 : at + SECTOR] for at in HEADER_OFFSETS]
    assert data == [theirs.read_bytes()[at + 80 : at + SECTOR] for at in HEADER_OFFSETS]
    assert qemu_img("compare", ours, theirs).returncode == 0
    assert qemu_img("check", ours).returncode == 0


def _reads_like_qemu(p: Path, tmp: Path) -> None:
    raw = tmp / "ref.raw"
    qemu_img("convert", "-O", "raw", p, raw)
    with VhdxDisk(HostFile(str(p)), str(p)) as d:
        assert d.read(0, d.virtual_size) == raw.read_bytes()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_replay_like_qemu(tmp_path: Path, name: str) -> None:
    src = base_image(tmp_path)
    make_dirty(src, SCENARIOS[name](src))
    for output in ("json", "human"):
        ours, theirs = _check_both(src, tmp_path, output, "-r", "all")
        assert_same_replay(ours, theirs)
    _reads_like_qemu(ours, tmp_path)
    replayed = qemu_img("check", "--output=json", theirs).returncode == 0
    assert replayed
    if name in ("guid-only", "oversized-entry", "count-overflow"):
        assert ours.read_bytes() == src.read_bytes()  # nothing to replay: nothing written


@pytest.mark.parametrize("name", ["several", "wrapping", "gap"])
def test_read_only_open_refused_like_qemu(tmp_path: Path, name: str) -> None:
    src = base_image(tmp_path)
    make_dirty(src, SCENARIOS[name](src))
    before = src.read_bytes()
    want = qemu_img("info", src, check=False)
    assert want.returncode == 1
    reason, hint, command = want.stderr.splitlines()
    reason = reason.removeprefix(f"qemu-img: Could not open '{src}': ")
    assert "contains a log that needs to be replayed" in reason
    assert (hint, command) == ("To replay the log, run:", f"qemu-img check -r all '{src}'")
    for args in (("info",), ("check",), ("map",), ("convert", "-O", "raw")):
        out = [tmp_path / "out.raw"] if args[0] == "convert" else []
        got = cli(*args, src, *out)
        assert got.returncode == 1, args
        lines = got.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("qcowlib: error: ")
        assert f"{reason}; to replay the log, run: qcowlib check -r all '{src}'" in lines[0]
    got = cli("validate", src)
    assert got.returncode == 1 and "qcowlib check -r all" in got.stdout
    assert src.read_bytes() == before


def test_guid_only_opens_read_only_like_qemu(tmp_path: Path) -> None:
    src = base_image(tmp_path)
    make_dirty(src, _guid_only(src))
    assert qemu_img("info", src).returncode == 0
    _reads_like_qemu(src, tmp_path)
    got = cli("validate", src)
    assert got.returncode == 0, got.stdout
    assert "nothing to replay" in got.stdout


def test_replay_leaks_mode_also_replays(tmp_path: Path) -> None:
    src = base_image(tmp_path)
    make_dirty(src, _several(src))
    ours, theirs = _check_both(src, tmp_path, "human", "-r", "leaks")
    assert_same_replay(ours, theirs)


def _dirty_hostile(
    tmp: Path, descriptors: list[Data | Zero], flushed: int = EOF, desc_seq: int | None = None
) -> Path:
    src = base_image(tmp)
    make_dirty(src, [(0, entry(3, descriptors, flushed=flushed, last=EOF, desc_seq=desc_seq))])
    return src


HOSTILE: dict[str, Callable[[Path], Path]] = {
    "offset-past-cap": lambda t: _dirty_hostile(t, [Data(1 << 62, sector(1))]),
    "offset-overflows": lambda t: _dirty_hostile(t, [Data((1 << 64) - SECTOR, sector(1))]),
    "zero-length-huge": lambda t: _dirty_hostile(t, [Zero(BLOCK0, (1 << 64) - SECTOR)]),
    "into-headers": lambda t: _dirty_hostile(t, [Data(64 * 1024, sector(1))]),
    "into-log": lambda t: _dirty_hostile(t, [Data(MIB + 8 * SECTOR, sector(1))]),
    "bad-descriptor": lambda t: _dirty_hostile(t, [Data(BLOCK0 + 100, sector(1))]),
    "descriptor-seq": lambda t: _dirty_hostile(t, [Data(BLOCK0, sector(1))], desc_seq=4),
    "flushed-past-eof": lambda t: _dirty_hostile(t, [Data(BLOCK0, sector(1))], flushed=EOF + MIB),
}
#: Where qemu-img refuses too (the others it would carry out, or write where asked).
QEMU_REFUSES = ("bad-descriptor", "descriptor-seq", "flushed-past-eof")


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_log_refused_without_writing(tmp_path: Path, name: str) -> None:
    src = HOSTILE[name](tmp_path)
    before = src.read_bytes()
    t0 = time.monotonic()
    got = cli("check", "-r", "all", src)
    assert time.monotonic() - t0 < 30
    assert got.returncode == 1, got.stdout
    lines = got.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcowlib: error: "), got.stderr
    assert "Traceback" not in got.stderr
    assert src.read_bytes() == before
    if name in QEMU_REFUSES:
        copy = tmp_path / "qemu.vhdx"
        shutil.copyfile(src, copy)
        assert qemu_img("check", "-r", "all", copy, check=False).returncode == 1


def test_whole_log_entry_with_bad_checksum_ends(tmp_path: Path) -> None:
    """QEMU's search never ends on this log; qcowlib refuses it."""
    src = base_image(tmp_path)
    make_dirty(src, [(0, entry(3, [Data(BLOCK0, sector(1))], flushed=EOF, last=EOF,
                               pad=254, bad_crc=True))])  # fmt: skip
    with pytest.raises(CorruptImage, match="search this log forever"):
        VhdxDisk(HostFile(str(src)), str(src))
    assert cli("check", "-r", "all", src).returncode == 1


def test_padded_entries_refused_before_writing(tmp_path: Path) -> None:
    """Entries with unused sectors at their end: QEMU's search accepts them, but its
    replay reads the next entry where the padding is and fails half-way (after writing
    the first entry); qcowlib plans the whole replay first and writes nothing."""
    src = base_image(tmp_path)
    a = entry(100, [Data(BLOCK0, sector(0x55))], flushed=EOF, last=EOF, pad=2)
    b = entry(101, [Data(BLOCK3, sector(0x56))], flushed=EOF, last=EOF)
    make_dirty(src, _at(0, [a, b]))
    before = src.read_bytes()
    ours, theirs = tmp_path / "ours.vhdx", tmp_path / "qemu.vhdx"
    shutil.copyfile(src, ours)
    shutil.copyfile(src, theirs)
    assert qemu_img("check", "-r", "all", theirs, check=False).returncode == 1
    got = cli("check", "-r", "all", ours)
    assert got.returncode == 1 and "cannot be replayed" in got.stderr
    assert ours.read_bytes() == before


def test_failed_replay_leaves_log_named(tmp_path: Path) -> None:
    """A write that fails half-way leaves the headers naming the log, so that the next
    read-write open replays it again."""
    from qcowlib.errors import QcowlibIOError
    from qcowlib.formats.vhdx import replay

    src = base_image(tmp_path)
    make_dirty(src, _several(src))
    host = HostFile(str(src), writable=True)
    real = host.pwrite
    calls = []

    def failing(offset: int, data: object) -> None:
        calls.append(offset)
        if len(calls) == 4:  # two header updates, then the replay's second write
            raise QcowlibIOError("injected write error", file=str(src))
        real(offset, data)  # type: ignore[arg-type]

    host.pwrite = failing  # type: ignore[method-assign]
    try:
        with pytest.raises(QcowlibIOError):
            replay.replay_log(host)
    finally:
        host.close()
    assert all(any(h[5]) for h in header_fields(src))
    with pytest.raises(UnsupportedFeature, match="needs to be replayed"):
        VhdxDisk(HostFile(str(src)), str(src))
    ours, theirs = _check_both(src, tmp_path, "json", "-r", "all")
    assert qemu_img("compare", ours, theirs).returncode == 0


def test_log_fields_checked_like_qemu(tmp_path: Path) -> None:
    """A log version other than 0 refuses the image, as QEMU refuses it."""
    src = base_image(tmp_path)
    set_log_guid(src, bytes(16))
    with src.open("r+b") as f:
        for at in HEADER_OFFSETS:
            f.seek(at)
            block = bytearray(f.read(SECTOR))
            block[64:66] = b"\1\0"
            block[4:8] = bytes(4)
            from qcowlib.formats.vhdx.spec import crc32c

            block[4:8] = struct.pack("<I", crc32c(bytes(block)))
            f.seek(at)
            f.write(block)
    assert qemu_img("info", src, check=False).returncode == 1
    with pytest.raises(CorruptImage, match="log version"):
        VhdxDisk(HostFile(str(src)), str(src))


# -- QEMU's Hyper-V sample (iotest 070) --------------------------------------------------


def test_qemu_sample_dirty_log(tmp_path: Path) -> None:
    src = sample("iotest-dirtylog-10G-4M.vhdx")
    copy = tmp_path / "dirty.vhdx"
    shutil.copyfile(src, copy)
    got = cli("info", copy)
    assert got.returncode == 1
    assert "opened read-only, but contains a log that needs to be replayed" in got.stderr
    assert qemu_img("info", copy, check=False).returncode == 1
    for output in ("json", "human"):
        ours, theirs = _check_both(copy, tmp_path, output, "-r", "all")
        assert_same_replay(ours, theirs)
    # iotest 070: after the replay the first 18 MiB read as 0xa5 (then zeros)
    for path in (ours, theirs):
        for pattern, start, length in ((0xA5, 0, 18), (0, 18, 8)):
            assert _qemu_io_pattern(path, pattern, start * MIB, length * MIB)
    with VhdxDisk(HostFile(str(ours)), str(ours)) as d:
        assert d.read(0, 18 * MIB) == b"\xa5" * (18 * MIB)
        assert d.read(18 * MIB, 8 * MIB) == bytes(8 * MIB)
    assert header_fields(ours)[0][8] <= vhdx_log.MAX_LOG_LENGTH


def _qemu_io_pattern(p: Path, pattern: int, offset: int, length: int) -> bool:
    """qemu-io reads ``length`` bytes of ``pattern`` at ``offset``."""
    out = subprocess.run(
        ["qemu-io", "-r", "-f", "vhdx", "-c", f"read -P {pattern} {offset} {length}", str(p)],
        capture_output=True,
        text=True,
        check=True,
    )
    return "verification failed" not in out.stdout + out.stderr and "read " in out.stdout


@pytest.mark.parametrize("name", ["iotest-dynamic-1G.vhdx", "test-disk2vhd.vhdx"])
def test_qemu_clean_samples(name: str) -> None:
    """iotest 070's Disk2VHD image (two identical headers) and a clean sample open, with
    qemu-img's ``info`` and ``check``."""
    src = sample(name)
    for args in (("info", "--output=json"), ("check", "--output=json")):
        got, want = cli(*args, src), qemu_img(*args, src, check=False)
        assert got.returncode == want.returncode
        assert json.loads(got.stdout) == json.loads(want.stdout)
