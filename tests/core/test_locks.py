"""QEMU's image locks: compared with qemu-img on images a real qemu-io holds open.

Each case runs qemu-img and qcowlib on the same held image and compares exit status
and message; ``-U`` must make both work.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import qcowlib
from tests.conftest import cli, qemu_img, qemu_io
from tests.core.chains import held_by_qemu_io

pytestmark = pytest.mark.usefixtures("qemu")

SHARED_WRITE = 'Failed to get shared "write" lock'
WRITE = 'Failed to get "write" lock'


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_io(base, "qcow2", "write -P 1 0 64k")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io(top, "qcow2", "write -P 2 4k 4k")
    return base, top


def _reading_commands(top: Path, base: Path, out: Path) -> list[tuple[list[str], list[str]]]:
    """(qcowlib args, qemu-img args) of the reading commands both have."""
    return [
        (["info", str(top)], ["info", str(top)]),
        (["map", str(top)], ["map", str(top)]),
        (["check", str(top)], ["check", str(top)]),
        (["compare", str(top), str(base)], ["compare", str(top), str(base)]),
        (["measure", "-O", "qcow2", str(top)], ["measure", "-O", "qcow2", str(top)]),
        (
            ["convert", "-O", "raw", str(top), str(out)],
            ["convert", "-O", "raw", str(top), str(out)],
        ),
    ]


def test_readers_refuse_an_image_held_for_writing_like_qemu_img(
    tmp_path: Path, chain: tuple[Path, Path]
) -> None:
    base, top = chain
    out = tmp_path / "out.raw"
    with held_by_qemu_io(top):
        for ours, theirs in _reading_commands(top, base, out):
            q = qemu_img(*theirs, check=False)
            r = cli(*ours)
            assert q.returncode == r.returncode != 0, (ours, q.stderr, r.stderr)
            assert SHARED_WRITE in q.stderr and SHARED_WRITE in r.stderr, r.stderr
            assert r.stderr.startswith(f"qcowlib: error: {top}:") and r.stderr.count("\n") == 1
            # -U reads it anyway, for both
            q = qemu_img(*theirs[:1], "-U", *theirs[1:], check=False)
            r = cli(*ours[:1], "-U", *ours[1:])
            assert q.returncode == r.returncode, (ours, q.stderr, r.stderr)
            assert r.returncode in (0, 1) and "lock" not in r.stderr  # compare: 1 differs
        for extra in (["checksum", str(top)], ["flatten", str(top), str(tmp_path / "f.qcow2")]):
            r = cli(*extra)
            assert r.returncode == 1 and SHARED_WRITE in r.stderr
            assert cli(*extra[:1], "--force-share", *extra[1:]).returncode == 0
        with pytest.raises(qcowlib.ImageLocked, match=SHARED_WRITE):
            qcowlib.open(str(top))
        with qcowlib.open(str(top), force_share=True) as disk:
            assert disk.read(4096, 4) == b"\x02" * 4


def test_a_backing_file_held_for_writing_names_the_top_image(
    tmp_path: Path, chain: tuple[Path, Path]
) -> None:
    base, top = chain
    out = tmp_path / "out.raw"
    with held_by_qemu_io(base):
        q = qemu_img("convert", "-O", "raw", top, out, check=False)
        r = cli("convert", "-O", "raw", top, out)
        assert q.returncode == r.returncode == 1
        assert SHARED_WRITE in q.stderr and "backing file" in q.stderr
        assert r.stderr.startswith(f"qcowlib: error: {top}: could not open backing file")
        assert SHARED_WRITE in r.stderr and str(base) in r.stderr
        # info does not open the backing file (as qemu-img info); --backing-chain does
        assert cli("info", top).returncode == qemu_img("info", top).returncode == 0
        r = cli("info", "--backing-chain", top)
        q = qemu_img("info", "--backing-chain", top, check=False)
        assert q.returncode == r.returncode == 1
        assert cli("convert", "-U", "-O", "raw", top, out).returncode == 0
        # none does not open it at all
        assert cli("convert", "--backing-policy", "none", "-O", "raw", top, out).returncode == 0


def test_our_readers_lock_the_whole_chain_as_qemu_img_does(chain: tuple[Path, Path]) -> None:
    base, top = chain

    def qemu_io_write(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write 0 512", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )

    with qcowlib.open(str(top)):
        for path in (top, base):  # top and backing file: a writer is refused
            res = qemu_io_write(path)
            assert res.returncode != 0 and WRITE in res.stderr, res.stderr
        # a second reader is fine
        assert qemu_img("info", "--backing-chain", top).returncode == 0
    with qcowlib.open(str(top), force_share=True):
        # -U shares everything: qemu-io may write (as with qemu-img -U)
        assert qemu_io_write(top).returncode == 0


@pytest.mark.parametrize("command", ["convert", "flatten"])
def test_an_output_held_by_qemu_is_not_replaced(
    tmp_path: Path, chain: tuple[Path, Path], command: str
) -> None:
    base, _ = chain
    held = tmp_path / "vm-disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", held, "1M")
    before = held.read_bytes()
    args: list[str | Path] = ["-O", "qcow2", base, held]
    for read_only in (False, True):  # a writer, or a reader that refuses to share write
        with held_by_qemu_io(held, read_only=read_only):
            q = qemu_img("convert", *args, check=False)
            r = cli(command, *args)
            assert q.returncode == r.returncode == 1
            assert WRITE in q.stderr and WRITE in r.stderr, r.stderr
            # -U is about reading: it does not make an output writable
            assert cli(command, "-U", *args).returncode == 1
    assert held.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".qcowlib-tmp")]
    assert cli(command, *args).returncode == 0  # free again


def test_writers_report_qemu_img_messages(chain: tuple[Path, Path]) -> None:
    _, top = chain
    with held_by_qemu_io(top):
        q = qemu_img("commit", top, check=False)
        r = cli("commit", top)
        assert q.returncode == r.returncode == 1
        assert WRITE in q.stderr and WRITE in r.stderr
        r = cli("check", "-r", "all", top)
        assert r.returncode == 1 and WRITE in r.stderr
