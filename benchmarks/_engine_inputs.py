"""The inputs of :mod:`benchmarks.bench_engine`, made by qemu-img and qemu-io, seeded, cached.

- ``base.qcow2``: 1 GiB, every byte allocated, alternating 1 MiB of random bytes and
  1 MiB of numbered text lines (the data is generated here into a raw file; qemu-img
  converts it, as a golden image is usually made, and the raw file is removed).
- ``overlay1.qcow2`` on the base and ``overlay2.qcow2`` on it: 3,000 writes of 64 KiB
  each at random 64 KiB-aligned offsets (``qemu-io write -P``), so each overlay's
  clusters lie in the file in the order the guest wrote them, not in disk order.
- ``flat.qcow2``, ``flat.raw`` and ``flat-zlib.qcow2``: the chain flattened by
  ``qemu-img convert`` to qcow2, raw and compressed qcow2 (sources of the conversions).
- ``small.qcow2``: 1 GiB virtual, 4 MiB of data (start-up-bound commands).
- ``big.qcow2``: 1 TiB virtual, 64 KiB clusters, one 64 KiB write in each of 1,024
  distinct 512 MiB regions (seeded sample of the 2,048), hence exactly 1,024 L2 tables;
  checked by counting the L1 entries after it is made.

A directory is reused when its ``READY`` file names the same recipe; otherwise it is
built again from scratch.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RECIPE = "engine-inputs v1: seed 11, base 1G alt 1M random/text, 2x3000x64K, 1T/1024 L2"
MIB = 1 << 20
GIB = 1 << 30
CLUSTER = 64 * 1024
BASE_SIZE = GIB
OVERLAY_WRITES = 3000
BIG_SIZE = 1 << 40
L2_SPAN = 512 * MIB  # guest bytes one L2 table maps with 64 KiB clusters (8,192 entries)
BIG_TABLES = 1024
SEED = 11
L1_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # qcow2 spec, "L1 table entry": bits 9-55


@dataclass(frozen=True)
class Inputs:
    """Paths of the benchmark's input images."""

    base: Path
    overlay1: Path
    overlay2: Path
    flat_qcow2: Path
    flat_raw: Path
    flat_zlib: Path
    small: Path
    big: Path

    @property
    def chain(self) -> list[Path]:
        """The chain's files, base first (what ``cat`` reads for the copy limit)."""
        return [self.base, self.overlay1, self.overlay2]


def inputs_in(directory: Path) -> Inputs:
    """The input paths under ``directory`` (made or not)."""
    return Inputs(
        base=directory / "base.qcow2",
        overlay1=directory / "overlay1.qcow2",
        overlay2=directory / "overlay2.qcow2",
        flat_qcow2=directory / "flat.qcow2",
        flat_raw=directory / "flat.raw",
        flat_zlib=directory / "flat-zlib.qcow2",
        small=directory / "small.qcow2",
        big=directory / "big.qcow2",
    )


def build(directory: Path, log: bool = True) -> Inputs:
    """Make the inputs in ``directory`` unless a complete set of this recipe is there."""
    paths = inputs_in(directory)
    ready = directory / "READY"
    if ready.exists() and ready.read_text().strip() == RECIPE:
        return paths
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    steps: list[tuple[str, Callable[[], None]]] = [
        ("base", lambda: _make_base(paths.base, rng)),
        ("overlay1", lambda: _make_overlay(paths.overlay1, paths.base, rng)),
        ("overlay2", lambda: _make_overlay(paths.overlay2, paths.overlay1, rng)),
        ("flat.qcow2", lambda: _convert(paths.overlay2, paths.flat_qcow2, "qcow2")),
        ("flat.raw", lambda: _convert(paths.overlay2, paths.flat_raw, "raw")),
        ("flat-zlib.qcow2", lambda: _convert(paths.flat_qcow2, paths.flat_zlib, "qcow2", "-c")),
        ("small.qcow2", lambda: _make_small(paths.small)),
        ("big.qcow2", lambda: _make_big(paths.big, rng)),
    ]
    for name, make in steps:
        if log:
            print(f"making {directory / name}", flush=True)
        make()
    ready.write_text(RECIPE + "\n")
    return paths


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def _text_block() -> bytes:
    """1 MiB of numbered lines: compressible as logs and text files are, not trivially."""
    lines: list[bytes] = []
    size = 0
    number = 0
    while size < MIB:
        line = f"{number:08d} the quick brown fox jumps over the lazy dog, qcowlib\n".encode()
        lines.append(line)
        size += len(line)
        number += 1
    return b"".join(lines)[:MIB]


def _make_base(path: Path, rng: np.random.Generator) -> None:
    raw = path.with_suffix(".raw.tmp")
    text = _text_block()
    with raw.open("wb") as f:
        for mib in range(BASE_SIZE // MIB):
            f.write(rng.bytes(MIB) if mib % 2 == 0 else text)
    _run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    raw.unlink()


def _make_overlay(path: Path, backing: Path, rng: np.random.Generator) -> None:
    _run(
        "qemu-img", "create", "-q", "-f", "qcow2",
        "-b", backing.name, "-F", "qcow2", str(path),
    )  # fmt: skip
    slots = rng.integers(0, BASE_SIZE // CLUSTER, OVERLAY_WRITES)
    patterns = rng.integers(1, 256, OVERLAY_WRITES)
    _qemu_io(
        path, [(int(s) * CLUSTER, CLUSTER, int(p)) for s, p in zip(slots, patterns, strict=True)]
    )


def _qemu_io(path: Path, writes: list[tuple[int, int, int]]) -> None:
    """``qemu-io -c 'write -P PATTERN OFFSET LENGTH' ...`` in one process, in list order."""
    commands: list[str] = []
    for offset, length, pattern in writes:
        commands += ["-c", f"write -q -P {pattern} {offset} {length}"]
    _run("qemu-io", "-f", "qcow2", *commands, str(path))


def _convert(src: Path, dst: Path, fmt: str, *extra: str) -> None:
    _run("qemu-img", "convert", "-q", *extra, "-O", fmt, str(src), str(dst))


def _make_small(path: Path) -> None:
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G")
    _qemu_io(path, [(i * 16 * MIB, MIB, 0x40 + i) for i in range(4)])


def _make_big(path: Path, rng: np.random.Generator) -> None:
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(path), "1T")
    regions = rng.choice(BIG_SIZE // L2_SPAN, BIG_TABLES, replace=False)
    within = rng.integers(0, L2_SPAN // CLUSTER, BIG_TABLES)
    writes = [
        (int(r) * L2_SPAN + int(w) * CLUSTER, CLUSTER, 1 + i % 255)
        for i, (r, w) in enumerate(zip(regions, within, strict=True))
    ]
    _qemu_io(path, writes)
    tables = count_l2_tables(path)
    if tables != BIG_TABLES:
        raise RuntimeError(f"{path}: {tables} L2 tables allocated, expected {BIG_TABLES}")


def count_l2_tables(path: Path) -> int:
    """How many L1 entries of a qcow2 point at an L2 table (qcow2 spec, "Header")."""
    with path.open("rb") as f:
        header = f.read(48)
        # magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
        # crypt_method, l1_size, l1_table_offset
        fields = struct.unpack(">IIQIIQIIQ", header[:48])
        l1_size, l1_table_offset = fields[7], fields[8]
        f.seek(l1_table_offset)
        l1 = np.frombuffer(f.read(l1_size * 8), dtype=">u8")
    return int(np.count_nonzero(l1 & np.uint64(L1_OFFSET_MASK)))
