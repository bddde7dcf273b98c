"""``checksum``: the multi-digest engine, file digests against hashlib/xxhash over the
file's bytes, content digests equal for one disk in every layout qemu-img makes of it and
equal to a digest of ``qemu-img convert -O raw``, and the CLI's output and refusals."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import random
import subprocess
import sys
import tracemalloc
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcowlib.cli import main as cli_main
from qcowlib.core import digest
from qcowlib.core.digest import ALGORITHMS, ZERO_CHUNK, MultiHasher
from qcowlib.errors import InvalidArgument, QcowlibError
from qcowlib.formats.opener import open_disk
from qcowlib.ops import checksum as checksum_mod
from qcowlib.ops.checksum import READ_CHUNK, checksum
from tests.conftest import have_qemu, qemu_img

if have_qemu():
    from tests.fixtures.generate import ensure_fixtures

    FIXTURES = ensure_fixtures()
    NAMES = sorted(FIXTURES)
else:  # pragma: no cover - the qemu fixture decides skip or fail
    FIXTURES = {}
    NAMES = ["<qemu-img missing>"]


def reference(
    data: bytes | bytearray | memoryview, algos: Iterable[str] = ALGORITHMS
) -> dict[str, str]:
    """One-shot digests straight from hashlib and xxhash."""
    out = {}
    for name in algos:
        if name == "xxh3_64":
            out[name] = xxhash.xxh3_64(data).hexdigest()
        elif name == "xxh3_128":
            out[name] = xxhash.xxh3_128(data).hexdigest()
        else:
            out[name] = hashlib.new(name, data).hexdigest()
    return out


def ours(*args: str | Path) -> tuple[int, str, str]:
    """Run our CLI in-process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


def qemu_io(path: Path, cmds: list[str], fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


def raw_digests(path: Path, tmp: Path, algos: Iterable[str] = ALGORITHMS) -> dict[str, str]:
    """Digests of the guest-visible disk as ``qemu-img convert -O raw`` writes it."""
    out = tmp / f"{path.name}.converted.raw"
    qemu_img("convert", "-O", "raw", path, out)
    digests = reference(out.read_bytes(), algos)
    out.unlink()
    return digests


# -- MultiHasher ---------------------------------------------------------------------------


def test_names_and_empty_digests() -> None:
    h = MultiHasher(ALGORITHMS)
    assert h.names == ALGORITHMS
    assert h.hexdigests() == reference(b"")
    assert list(h.hexdigests()) == list(ALGORITHMS)
    assert MultiHasher().names == ("md5", "sha512")
    assert MultiHasher(["sha1", "md5", "sha1"]).names == ("sha1", "md5")
    assert MultiHasher("sha256").names == ("sha256",)


@pytest.mark.parametrize("algos", [["md5", "crc32"], ["MD5"], ["sha-512"], [""], []])
def test_unknown_or_no_algorithm_refused(algos: list[str]) -> None:
    with pytest.raises(InvalidArgument, match="algorithm"):
        MultiHasher(algos)


def test_negative_zero_run_refused() -> None:
    with pytest.raises(InvalidArgument):
        MultiHasher().update_zeros(-1)


@pytest.mark.parametrize("threads", [False, True])
def test_large_buffers_and_zero_runs(threads: bool) -> None:
    data = random.Random(1).randbytes(3 * digest.THREAD_MIN + 5)
    n_zero = 2 * ZERO_CHUNK + 3
    with MultiHasher(ALGORITHMS, threads=threads) as h:
        h.update(data)
        h.update_zeros(n_zero)
        h.update(memoryview(data)[:7])
        assert h.length == len(data) + n_zero + 7
        assert h.hexdigests() == reference(data + bytes(n_zero) + data[:7])


def test_zero_runs_allocate_nothing_of_their_size() -> None:
    n = 256 * 1024 * 1024
    with MultiHasher(["xxh3_64", "md5"]) as h:
        h.update_zeros(1)  # the shared zero buffer exists from here on
        tracemalloc.start()
        try:
            h.update_zeros(n)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 1024 * 1024


def test_worker_failure_is_raised_after_all_workers_finish() -> None:
    class Broken:
        def update(self, data: object) -> None:
            raise RuntimeError("boom")

        def hexdigest(self) -> str:
            return ""

    h = MultiHasher(["md5", "sha1", "sha512"])
    h._hashers[2] = Broken()
    with pytest.raises(RuntimeError, match="boom"):
        h.update(bytes(digest.THREAD_MIN))
    h.close()


_DATA = st.tuples(st.just("data"), st.binary(max_size=5000), st.lists(st.integers(0, 5000)))
_ZEROS = st.tuples(st.just("zeros"), st.integers(0, 70000), st.lists(st.integers(0, 70000)))
#: Zero runs around the shared zero buffer's size (rarer: they cost time).
_BIG_ZEROS: st.SearchStrategy[tuple[str, int, list[int]]] = st.tuples(
    st.just("zeros"), st.sampled_from([ZERO_CHUNK - 1, ZERO_CHUNK, ZERO_CHUNK + 1]), st.just([])
)
_PIECES: st.SearchStrategy[tuple[str, Any, list[int]]] = st.one_of(
    _DATA, _ZEROS, _DATA, _ZEROS, _DATA, _ZEROS, _BIG_ZEROS
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(_PIECES, max_size=12),
    algos=st.lists(st.sampled_from(ALGORITHMS), min_size=1, unique=True),
    threads=st.booleans(),
    thread_min=st.sampled_from([0, 1000, digest.THREAD_MIN]),
)
def test_any_chunking_gives_one_shot_digests(
    pieces: list[tuple[str, Any, list[int]]],
    algos: list[str],
    threads: bool,
    thread_min: int,
) -> None:
    whole = bytearray()
    with (
        mock.patch.object(digest, "THREAD_MIN", thread_min),
        MultiHasher(algos, threads=threads) as h,
    ):
        for kind, value, cuts in pieces:
            if kind == "data":
                whole += value
                bounds = sorted({0, len(value), *(c for c in cuts if c < len(value))})
                for a, b in itertools.pairwise(bounds):
                    h.update(memoryview(value)[a:b])
            else:
                whole += bytes(value)
                bounds = sorted({0, value, *(c for c in cuts if c < value)})
                for a, b in itertools.pairwise(bounds):
                    h.update_zeros(b - a)
        assert h.length == len(whole)
        assert h.hexdigests() == reference(whole, algos)


# -- file digests ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, 4095, READ_CHUNK - 1, READ_CHUNK, READ_CHUNK + 1, 2 * READ_CHUNK + 12345],
)
def test_file_digests_are_over_the_bytes_as_stored(size: int, tmp_path: Path) -> None:
    data = random.Random(size).randbytes(size)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    result = checksum(str(path), ALGORITHMS)
    assert result == {"file": reference(data), "size": size}


def test_default_algorithms_are_glances(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"glance")
    result = checksum(str(path))
    assert result == {
        "file": {
            "md5": hashlib.md5(b"glance").hexdigest(),
            "sha512": hashlib.sha512(b"glance").hexdigest(),
        },
        "size": 6,
    }


def test_sparse_file_digest_reads_holes(tmp_path: Path) -> None:
    path = tmp_path / "sparse.bin"
    with path.open("wb") as f:
        f.truncate(3 * READ_CHUNK + 100)
        f.seek(READ_CHUNK + 3)
        f.write(b"data")
    assert checksum(str(path), ["sha256"])["file"] == reference(path.read_bytes(), ["sha256"])


@pytest.mark.usefixtures("qemu")
@pytest.mark.parametrize("name", NAMES)
def test_fixtures_file_and_content(name: str, tmp_path: Path) -> None:
    fx = FIXTURES[name]
    result = checksum(str(fx.path), ["md5", "sha512", "xxh3_128"], content=True)
    data = fx.path.read_bytes()
    assert result["file"] == reference(data, ["md5", "sha512", "xxh3_128"])
    assert result["size"] == len(data)
    assert result["content"] == raw_digests(fx.path, tmp_path, ["md5", "sha512", "xxh3_128"])


# -- content digests: one disk, many layouts -------------------------------------------------

UNIT = 64 * 1024
#: Not a multiple of any cluster size tried, but of 512 (so raw is its own disk).
DISK_SIZE = 8 * 1024 * 1024 + 4608


def _seeded_disk(seed: int) -> tuple[bytes, list[str]]:
    """A disk's bytes and, per 64 KiB unit, what it holds."""
    rng = random.Random(seed)
    out = bytearray(DISK_SIZE)
    kinds = []
    for start in range(0, DISK_SIZE, UNIT):
        n = min(UNIT, DISK_SIZE - start)
        kind = rng.choices(["random", "text", "zeros", "hole", "partial"], [3, 2, 2, 3, 1])[0]
        if kind == "random":
            out[start : start + n] = rng.randbytes(n)
        elif kind == "text":
            out[start : start + n] = (b"qcowlib unit %d " % start * (n // 16 + 1))[:n]
        elif kind == "partial":
            at = rng.randrange(0, n, 512)
            out[start + at : start + at + 512] = rng.randbytes(min(512, n - at))
        kinds.append(kind)
    return bytes(out), kinds


def _write_raw(path: Path, data: bytes, kinds: list[str]) -> None:
    """Write ``data`` sparsely: holes stay holes, "zeros" units are written zeros."""
    with path.open("wb") as f:
        f.truncate(len(data))
        for i, kind in enumerate(kinds):
            if kind != "hole":
                f.seek(i * UNIT)
                f.write(data[i * UNIT : (i + 1) * UNIT])


def _unit_files(tmp: Path, data: bytes) -> list[Path]:
    paths = []
    for i in range(0, len(data), UNIT):
        p = tmp / f"unit{i // UNIT}.bin"
        p.write_bytes(data[i : i + UNIT])
        paths.append(p)
    return paths


def _chain(
    tmp: Path, name: str, data: bytes, units: list[Path], layers: list[tuple[str, str]], seed: int
) -> Path:
    """A chain whose top reads as ``data``: each unit is written at one layer, with stale
    junk below it and nothing above; zero units hide junk with ``write -z``."""
    rng = random.Random(seed)
    cmds: list[list[str]] = [[] for _ in layers]
    for i, unit in enumerate(units):
        off, n = i * UNIT, unit.stat().st_size
        owner = rng.randrange(len(layers))
        junk_below = False
        for j in range(owner):
            if rng.random() < 0.5:
                cmds[j].append(f"write -q -P {0x40 + j} {off} {n}")
                junk_below = True
        if any(data[off : off + n]):
            cmds[owner].append(f"write -q -s {unit} {off} {n}")
        elif junk_below or rng.random() < 0.3:
            cmds[owner].append(f"write -q -z {off} {n}")
    paths: list[Path] = []
    for depth, (fmt, opts) in enumerate(layers):
        path = tmp / f"{name}.{depth}.{fmt}"
        args: list[str | Path] = ["create", "-q", "-f", fmt]
        if opts:
            args += ["-o", opts]
        if paths:
            args += ["-b", paths[-1].name, "-F", layers[depth - 1][0]]
        qemu_img(*args, path, str(len(data)))
        if cmds[depth]:
            qemu_io(path, cmds[depth], fmt)
        paths.append(path)
    return paths[-1]


def _zero_clusters(tmp: Path, data: bytes, kinds: list[str], units: list[Path]) -> Path:
    """One qcow2 with data clusters and zero clusters, allocated and not."""
    path = tmp / "zero-clusters.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, str(len(data)))
    cmds = []
    for i, (kind, unit) in enumerate(zip(kinds, units, strict=True)):
        off, n = i * UNIT, unit.stat().st_size
        if any(data[off : off + n]):
            cmds.append(f"write -q -s {unit} {off} {n}")
        elif kind == "zeros":
            cmds += [f"write -q -P 0x77 {off} {n}", f"write -q -z {off} {n}"]
        elif i % 2:
            cmds.append(f"write -q -z -u {off} {n}")
    qemu_io(path, cmds)
    return path


@pytest.fixture(scope="module")
def one_disk(qemu: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, Path]]:
    """One seeded disk in many layouts: its bytes and ``{layout: top image}``."""
    tmp = tmp_path_factory.mktemp("one-disk")
    data, kinds = _seeded_disk(2024)
    raw = tmp / "disk.raw"
    _write_raw(raw, data, kinds)
    units = _unit_files(tmp, data)
    images = {"raw": raw}
    for name, extra in {
        "qcow2": [],
        "qcow2-c512": ["-o", "cluster_size=512"],
        "qcow2-c2m-el2": ["-o", "cluster_size=2M,extended_l2=on"],
        "qcow2-v2": ["-o", "compat=0.10"],
        "compressed": ["-c"],
        "compressed-zstd-c4k": ["-c", "-o", "compression_type=zstd,cluster_size=4k"],
    }.items():
        images[name] = tmp / f"{name}.qcow2"
        qemu_img("convert", "-O", "qcow2", *extra, raw, images[name])
    images["chain2"] = _chain(tmp, "chain2", data, units, [("qcow2", ""), ("qcow2", "")], 1)
    images["chain3"] = _chain(
        tmp,
        "chain3",
        data,
        units,
        [("qcow2", "cluster_size=4k"), ("qcow2", "cluster_size=512"), ("qcow2", "")],
        2,
    )
    images["chain3-raw-base"] = _chain(
        tmp, "chain3r", data, units, [("raw", ""), ("qcow2", "extended_l2=on"), ("qcow2", "")], 3
    )
    images["zero-clusters"] = _zero_clusters(tmp, data, kinds, units)
    return data, images


LAYOUTS = [
    "raw",
    "qcow2",
    "qcow2-c512",
    "qcow2-c2m-el2",
    "qcow2-v2",
    "compressed",
    "compressed-zstd-c4k",
    "chain2",
    "chain3",
    "chain3-raw-base",
    "zero-clusters",
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_content_is_the_same_for_every_layout(
    layout: str, one_disk: tuple[bytes, dict[str, Path]], tmp_path: Path
) -> None:
    data, images = one_disk
    path = images[layout]
    result = checksum(str(path), ALGORITHMS, content=True)
    assert result["content"] == reference(data)
    assert result["content"] == raw_digests(path, tmp_path)
    assert result["file"] == reference(path.read_bytes())
    assert result["size"] == path.stat().st_size


def test_layouts_are_what_they_claim(one_disk: tuple[bytes, dict[str, Path]]) -> None:
    _, images = one_disk
    for name, depth in (("chain2", 2), ("chain3", 3), ("chain3-raw-base", 3)):
        chain = json.loads(
            qemu_img("info", "--backing-chain", "--output=json", images[name]).stdout
        )
        assert len(chain) == depth, name
        depths = {
            e["depth"] for e in json.loads(qemu_img("map", "--output=json", images[name]).stdout)
        }
        assert depths >= set(range(depth)), name
    zmap = json.loads(qemu_img("map", "--output=json", images["zero-clusters"]).stdout)
    assert any(e["zero"] and not e["data"] and "offset" in e for e in zmap)  # allocated zero
    assert any(e["zero"] and not e["data"] and "offset" not in e for e in zmap)
    info = json.loads(qemu_img("info", "--output=json", images["compressed"]).stdout)
    assert info["actual-size"] < images["qcow2"].stat().st_size


def test_content_of_a_raw_file_of_partial_sectors(tmp_path: Path) -> None:
    """The block layer pads a raw file to whole sectors; so does the content digest."""
    data = random.Random(5).randbytes(1000)
    path = tmp_path / "odd.raw"
    path.write_bytes(data)
    result = checksum(str(path), ["sha256"], content=True)
    assert result == {
        "file": reference(data, ["sha256"]),
        "content": reference(data + bytes(24), ["sha256"]),
        "size": 1000,
    }


def test_content_of_a_raw_file_is_its_file_digest(tmp_path: Path) -> None:
    data = random.Random(6).randbytes(READ_CHUNK + 512)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    result = checksum(str(path), ["md5"], content_algos=["md5", "xxh3_64"])
    assert result == {
        "file": reference(data, ["md5"]),
        "content": reference(data, ["md5", "xxh3_64"]),
        "size": len(data),
    }


def test_forced_format_raw_digests_a_qcow2_as_bytes(
    one_disk: tuple[bytes, dict[str, Path]],
) -> None:
    _, images = one_disk
    path = images["qcow2"]
    result = checksum(str(path), ["sha1"], content=True, fmt="raw")
    padded = path.read_bytes()
    padded += bytes(-len(padded) % 512)
    assert result["content"] == reference(padded, ["sha1"])


def test_small_buffers_cross_every_extent_boundary(
    one_disk: tuple[bytes, dict[str, Path]],
) -> None:
    """A read buffer smaller than a cluster and zero runs both inline and fed apart."""
    data, images = one_disk
    with (
        mock.patch.object(checksum_mod, "ZERO_INLINE", 70000),
        open_disk(str(images["chain3"])) as disk,
        MultiHasher(["md5"]) as h,
    ):
        checksum_mod.hash_disk(disk, h, chunk=3000)
        assert h.hexdigests() == reference(data, ["md5"])


# -- errors ----------------------------------------------------------------------------------


def test_api_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.raw"
    path.write_bytes(b"x")
    with pytest.raises(InvalidArgument, match="unknown checksum algorithm 'crc32'"):
        checksum(str(path), ["crc32"])
    with pytest.raises(InvalidArgument):
        checksum(str(path), content_algos=["nope"])
    with pytest.raises(QcowlibError, match="no such file"):
        checksum(str(tmp_path / "missing"))
    with pytest.raises(QcowlibError, match="is a directory"):
        checksum(str(tmp_path))
    with pytest.raises(QcowlibError, match="is a directory"):
        checksum(str(tmp_path), content=True)


# -- command line ----------------------------------------------------------------------------


def test_cli_json_is_the_contracts_structure(tmp_path: Path) -> None:
    data = b"qcowlib" * 1000
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    status, out, err = ours("checksum", "--output", "json", path)
    assert (status, err) == (0, "")
    assert json.loads(out) == {"file": reference(data, ["md5", "sha512"]), "size": 7000}
    assert list(json.loads(out)) == ["file", "size"]

    status, out, err = ours("checksum", "--output=json", "--content", "--algo", "sha256", path)
    assert (status, err) == (0, "")
    padded = data + bytes(-len(data) % 512)
    result = json.loads(out)
    assert list(result) == ["file", "content", "size"]
    assert result == {
        "file": reference(data, ["sha256"]),
        "content": reference(padded, ["sha256"]),
        "size": 7000,
    }


def test_cli_human_lines(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(512))
    status, out, err = ours("checksum", "--algo", "md5, xxh3_128", "--content", path)
    assert (status, err) == (0, "")
    d = reference(bytes(512), ["md5", "xxh3_128"])
    assert out.splitlines() == [
        f"md5               {d['md5']}  {path}",
        f"xxh3_128          {d['xxh3_128']}  {path}",
        f"content-md5       {d['md5']}  {path}",
        f"content-xxh3_128  {d['xxh3_128']}  {path}",
        f"size              512  {path}",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--algo", "md5,bogus"], "unknown checksum algorithm 'bogus'"),
        (["--algo", ""], "no checksum algorithm given"),
        (["--algo", "sha512", "--content", "-f", "qcow2"], "qcow2"),
    ],
)
def test_cli_errors_are_one_line_and_status_1(
    args: list[str], message: str, tmp_path: Path
) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(4096))
    status, out, err = ours("checksum", *args, path)
    assert status == 1
    assert out == ""
    assert err.startswith("qcowlib: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_cli_missing_file(tmp_path: Path) -> None:
    status, out, err = ours("checksum", tmp_path / "missing.qcow2")
    assert (status, out) == (1, "")
    assert err.startswith("qcowlib: error: ") and err.count("\n") == 1


def test_no_xxhash_or_numpy_until_needed(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"abc")
    code = (
        "import sys, qcowlib; "
        "light = [m for m in ('xxhash', 'numpy') if m in sys.modules]; "
        "import qcowlib.ops.checksum as c; "
        f"c.checksum({str(path)!r}, ['md5', 'sha512']); "
        "after = [m for m in ('xxhash',) if m in sys.modules]; "
        "print(light, after)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[] []"


def test_progress_reaches_the_end_of_both_passes(tmp_path: Path) -> None:
    """``-p`` (API ``progress=``): monotonic, ending at the total of file and disk."""
    if not have_qemu():
        pytest.skip("qemu-img not installed")
    image = tmp_path / "p.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "8M")
    qemu_io(image, ["write -P 7 0 1M"])
    seen: list[tuple[int, int]] = []
    checksum(image, content=True, progress=lambda d, t: seen.append((d, t)))
    assert seen and all(a[0] <= b[0] for a, b in itertools.pairwise(seen))
    assert seen[-1][0] == seen[-1][1] == image.stat().st_size + 8 * 2**20
    out = subprocess.run(
        [sys.executable, "-m", "qcowlib", "checksum", "-p", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0 and "100" in out.stderr
