"""Fragmented QED, Parallels and qcow (v1) images for :mod:`benchmarks.bench_engine`.

Each image is ``SIZE`` (256 MiB) of guest disk of which about ``FILL`` (40 %) is
written, the way a guest writes: a seeded random 40 % of the 1 MiB regions is chosen,
each region is cut into pieces of 512 B to 64 KiB (log-uniform, 512-aligned), one piece
in ten is dropped (left unwritten), and all the pieces of all the regions are written
in one shuffled order by ``qemu-io write -P`` (thousands of scattered small writes, so
the clusters lie in the file in the order the guest first touched them).

- ``frag-4k.qed``: QED, 4 KiB clusters; ``frag-64k.qed``: QED, 64 KiB clusters.
- ``frag.parallels``: Parallels as ``qemu-img create -f parallels`` makes it (1 MiB
  clusters, preallocated in chunks, so unwritten parts of a cluster are holes).
- ``frag.qcow``: qcow (v1), ``qemu-img convert -O qcow`` of ``frag-64k.qed``.
- ``frag.vmdk`` (monolithicSparse, 64 KiB grains), ``frag.vdi`` (1 MiB blocks),
  ``frag.vhd`` (vpc dynamic, 2 MiB blocks, ``force_size``) and ``frag.vhdx`` (8 MiB
  blocks, unwritten parts of a block are holes in the file): the same writes.
- ``frag-stream.vmdk``: streamOptimized, ``qemu-img convert -O vmdk -o
  subformat=streamOptimized`` of ``frag.vmdk``.
- ``scattered.raw``: a sparse raw file of 16 GiB holding 200,000 random 4 KiB blocks at
  seeded random 4 KiB-aligned offsets (an extreme of scattered small writes: each block
  is a range of its own for every tool that copies only data).

A directory is reused when its ``READY`` file names the same recipe.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RECIPE = (
    "clustermap-inputs v3: seed 13, 256M, 40% of 1M regions, pieces 512B-64K, 1/10 dropped;"
    " qed 4k/64k, parallels, qcow, vmdk, vmdk stream, vdi, vpc, vhdx;"
    " scattered raw 16G, 200000x4K"
)
MIB = 1 << 20
SIZE = 256 * MIB
FILL = 0.4
REGION = MIB
SEED = 13
#: qemu-io commands per process (an argv well under the kernel's limit).
BATCH = 4000
SCATTERED_SIZE = 16 << 30
SCATTERED_BLOCKS = 200_000


@dataclass(frozen=True)
class ClusterMapInputs:
    """Paths of the fragmented images."""

    qed_4k: Path
    qed_64k: Path
    parallels: Path
    qcow: Path
    scattered_raw: Path
    vmdk: Path
    vmdk_stream: Path
    vdi: Path
    vhd: Path
    vhdx: Path


def inputs_in(directory: Path) -> ClusterMapInputs:
    """The paths under ``directory`` (made or not)."""
    return ClusterMapInputs(
        directory / "frag-4k.qed",
        directory / "frag-64k.qed",
        directory / "frag.parallels",
        directory / "frag.qcow",
        directory / "scattered.raw",
        directory / "frag.vmdk",
        directory / "frag-stream.vmdk",
        directory / "frag.vdi",
        directory / "frag.vhd",
        directory / "frag.vhdx",
    )


def write_plan(seed: int = SEED, size: int = SIZE, fill: float = FILL) -> list[tuple[int, int]]:
    """``(offset, length)`` of every write, in the order they are made."""
    rng = np.random.default_rng(seed)
    regions = rng.choice(size // REGION, int(size // REGION * fill), replace=False)
    pieces: list[tuple[int, int]] = []
    for region in regions.tolist():
        pos = region * REGION
        end = pos + REGION
        while pos < end:
            length = min(end - pos, 512 * int(2 ** rng.uniform(0, 7)))
            if rng.random() >= 0.1:
                pieces.append((pos, length))
            pos += length
    order = rng.permutation(len(pieces))
    return [pieces[i] for i in order.tolist()]


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def _write(path: Path, fmt: str, plan: list[tuple[int, int]]) -> None:
    for at in range(0, len(plan), BATCH):
        commands: list[str] = []
        for i, (offset, length) in enumerate(plan[at : at + BATCH], start=at):
            commands += ["-c", f"write -q -P {1 + i % 255} {offset} {length}"]
        _run("qemu-io", "-f", fmt, *commands, str(path))


def _make_scattered(path: Path) -> None:
    """``scattered.raw`` (see the module docstring), written in offset order."""
    rng = np.random.default_rng(SEED)
    blocks = np.sort(rng.choice(SCATTERED_SIZE // 4096, SCATTERED_BLOCKS, replace=False))
    with path.open("wb") as f:
        f.truncate(SCATTERED_SIZE)
        for block in blocks.tolist():
            f.seek(block * 4096)
            f.write(rng.bytes(4096))


def build(directory: Path, log: bool = True) -> ClusterMapInputs:
    """Make the images in ``directory`` unless a complete set of this recipe is there."""
    paths = inputs_in(directory)
    ready = directory / "READY"
    if ready.exists() and ready.read_text().strip() == RECIPE:
        return paths
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    plan = write_plan()
    made = [
        (paths.qed_4k, "qed", ["-o", "cluster_size=4096"]),
        (paths.qed_64k, "qed", ["-o", "cluster_size=65536"]),
        (paths.parallels, "parallels", []),
        (paths.vmdk, "vmdk", []),
        (paths.vdi, "vdi", []),
        (paths.vhd, "vpc", ["-o", "subformat=dynamic,force_size=on"]),
        (paths.vhdx, "vhdx", []),
    ]
    for path, fmt, opts in made:
        if log:
            print(f"making {path}", flush=True)
        _run("qemu-img", "create", "-q", "-f", fmt, *opts, str(path), str(SIZE))
        _write(path, fmt, plan)
    if log:
        print(f"making {paths.qcow}", flush=True)
    _run("qemu-img", "convert", "-q", "-O", "qcow", str(paths.qed_64k), str(paths.qcow))
    if log:
        print(f"making {paths.vmdk_stream}", flush=True)
    stream = ["-O", "vmdk", "-o", "subformat=streamOptimized"]
    _run("qemu-img", "convert", "-q", *stream, str(paths.vmdk), str(paths.vmdk_stream))
    if log:
        print(f"making {paths.scattered_raw}", flush=True)
    _make_scattered(paths.scattered_raw)
    ready.write_text(RECIPE + "\n")
    return paths


if __name__ == "__main__":
    import sys

    build(Path(sys.argv[1]))
