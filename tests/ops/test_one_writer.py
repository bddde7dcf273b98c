"""One writer per output format: a file and a stream of one image are the same bytes.

Every writable format goes through its one layout and the one emitter
(:mod:`qcowlib.core.emit`) to a file (``flatten``/``convert``) and to a stream
(``flatten_stream``).  Checked against qemu-img: ``qemu-img check`` where it checks the
format, ``qemu-img compare`` against the source chain; hashers against hashlib over the
bytes produced; and the chain is read once for a file, hashers or not.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import qcowlib
from qcowlib.core import runs as runs_mod
from qcowlib.core.disk import Runs
from qcowlib.ops.flatten import flatten, flatten_stream
from tests.conftest import qemu_img

pytestmark = pytest.mark.usefixtures("qemu")

#: Formats ``qemu-img check`` checks (it refuses raw and vpc).
CHECKED = {"qcow2", "vdi", "vmdk", "vhdx"}

CASES: list[tuple[str, dict[str, str], bool]] = [
    ("raw", {}, False),
    ("qcow2", {}, False),
    ("qcow2", {}, True),
    ("qcow2", {"compression_type": "zstd"}, True),
    ("qcow2", {"compat": "0.10"}, False),
    ("qcow2", {"compat": "0.10", "cluster_size": "4096"}, True),
    ("qcow2", {"cluster_size": "512"}, False),
    ("qcow2", {"cluster_size": "4096", "refcount_bits": "1"}, True),
    ("qcow2", {"cluster_size": "2M"}, False),
    ("vdi", {}, False),
    ("vdi", {"static": "on"}, False),
    ("vmdk", {}, False),
    ("vmdk", {"subformat": "streamOptimized"}, False),
    ("vpc", {}, False),
    ("vpc", {"subformat": "fixed"}, False),
    ("vhdx", {}, False),
    ("vhdx", {"subformat": "fixed"}, False),
]


def _io(path: Path, fmt: str, *cmds: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """A qcow2 base (data, compressed data, a tail not on a cluster) under an overlay
    with zeros over data and data over holes."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", base, "10M")
    _io(base, "qcow2", "write -P 0x11 0 3M", "write -c -P 0x13 4M 64k", "write -P 0x12 9M 1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    _io(top, "qcow2", "write -P 0x21 1M 100k", "write -z 2M 512k", "write -P 0x22 6M 7000")
    return top


@pytest.fixture
def fixed_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Identifiers and timestamps held fixed: two writes of one image are the same bytes."""
    monkeypatch.setattr(random, "getrandbits", lambda bits: 0x1234ABCD)
    monkeypatch.setattr(secrets, "randbits", lambda bits: 0x5678)
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=42))
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)


@pytest.mark.parametrize(("out_format", "options", "compress"), CASES)
@pytest.mark.usefixtures("fixed_ids")
def test_file_and_stream_are_the_same_image(
    out_format: str, options: dict[str, str], compress: bool, chain: Path, tmp_path: Path
) -> None:
    out = tmp_path / f"flat.{out_format}"
    md5, sha512 = hashlib.md5(), hashlib.sha512()
    written = flatten(
        str(chain), str(out), out_format, options=options, compress=compress,
        hashers=[md5, sha512],
    )  # fmt: skip
    data = out.read_bytes()
    assert written == len(data)
    assert md5.hexdigest() == hashlib.md5(data).hexdigest()
    assert sha512.hexdigest() == hashlib.sha512(data).hexdigest()
    if out_format in CHECKED:
        res = qemu_img("check", "-f", out_format, out, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
    res = qemu_img("compare", "-F", out_format, chain, out, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    stream_md5 = hashlib.md5()
    with flatten_stream(
        str(chain), out_format, options=options, compress=compress, name=out.name
    ) as stream:
        streamed = b"".join(stream.chunks(hashers=[stream_md5]))
        assert len(streamed) == stream.size
    assert streamed == data
    assert stream_md5.hexdigest() == md5.hexdigest()


@pytest.fixture
def bytes_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Guest bytes read from the chain (every data read of the writers goes here)."""
    counted = [0]
    original = runs_mod.ChainReader.read

    def counting(
        self: runs_mod.ChainReader,
        runs: Runs,
        a: int,
        b: int,
        start: int,
        view: memoryview,
    ) -> None:
        counted[0] += len(view)
        original(self, runs, a, b, start, view)

    monkeypatch.setattr(runs_mod.ChainReader, "read", counting)
    return counted


@pytest.mark.parametrize(
    ("out_format", "options", "compress"),
    [("qcow2", {}, True), ("vmdk", {"subformat": "streamOptimized"}, False), ("vpc", {}, False)],
)
def test_hashers_do_not_read_the_chain_again(
    out_format: str,
    options: dict[str, str],
    compress: bool,
    chain: Path,
    tmp_path: Path,
    bytes_read: list[int],
) -> None:
    """flatten and convert with hashers read the chain exactly as much as without (once);
    a stream reads it twice (its size is planned before the first byte)."""
    for write in (flatten, qcowlib.convert):
        bytes_read[0] = 0
        write(str(chain), str(tmp_path / "plain"), out_format, options=options, compress=compress)
        plain = bytes_read[0]
        assert 0 < plain <= 10 << 20  # at most the disk, once
        bytes_read[0] = 0
        md5 = hashlib.md5()
        write(str(chain), str(tmp_path / "hashed"), out_format, options=options,
              compress=compress, hashers=[md5])  # fmt: skip
        assert bytes_read[0] == plain, write
        assert md5.hexdigest() == hashlib.md5((tmp_path / "hashed").read_bytes()).hexdigest()
    bytes_read[0] = 0
    with flatten_stream(str(chain), out_format, options=options, compress=compress) as stream:
        for _ in stream.chunks(hashers=[hashlib.md5()]):
            pass
    assert bytes_read[0] == 2 * plain
