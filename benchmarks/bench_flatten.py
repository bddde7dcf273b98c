"""Flatten a 3-deep chain to qcow2: ``qcowlib flatten`` vs ``qemu-img convert`` of the top.

    .venv/bin/python -m benchmarks.bench_flatten [--size 2G] [--data 1G] [--repeat 5]

The chain: a raw base with half the data, a 4 KiB-cluster qcow2 overlay and a 64 KiB
top overlay with a quarter each, all seeded.  Both tools flush their output.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._harness import Run, paired, qcowlib_cmd, report, require_qemu
from qcowlib._units import parse_size

TEXT = b"qcowlib flatten benchmark: compressible text between random runs.\n"


def _fill(path: Path, fmt: str, size: int, data: int, rng: np.random.Generator) -> None:
    """Write ``data`` bytes in scattered 64 KiB..4 MiB runs with qemu-io."""
    cmds: list[str] = []
    written = 0
    pattern = 1
    while written < data:
        length = int(rng.integers(1, 64)) * 65536
        start = int(rng.integers(0, (size - length) // 65536)) * 65536
        cmds += ["-c", f"write -P {pattern} {start} {length}"]
        pattern = pattern % 250 + 1
        written += length
    subprocess.run(["qemu-io", "-f", fmt, *cmds, str(path)], check=True, capture_output=True)


def make_chain(d: Path, size: int, data: int) -> Path:
    rng = np.random.default_rng(11)
    base = d / "base.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), str(size)], check=True)
    _fill(base, "raw", size, data // 2, rng)
    mid = d / "mid.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
         "-b", "base.raw", "-F", "raw", str(mid)],
        check=True,
    )  # fmt: skip
    _fill(mid, "qcow2", size, data // 4, rng)
    top = d / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top)],
        check=True,
    )
    _fill(top, "qcow2", size, data // 4, rng)
    return top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--data", default="1G")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    require_qemu()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        top = make_chain(d, parse_size(args.size), parse_size(args.data))
        out = str(d / "flat.qcow2")
        ref, ours = paired(
            ["qemu-img", "convert", "-t", "writeback", "-O", "qcow2", str(top), out],
            qcowlib_cmd("flatten", str(top), out),
            args.repeat,
            out,
        )
        rows: list[tuple[str, Run, Run]] = [("flatten 3-deep chain -> qcow2", ref, ours)]
        ref_c, ours_c = paired(
            ["qemu-img", "convert", "-t", "writeback", "-c", "-O", "qcow2", str(top), out],
            qcowlib_cmd("flatten", "-c", str(top), out),
            args.repeat,
            out,
        )
        rows.append(("flatten 3-deep chain -> qcow2 -c", ref_c, ours_c))
    print(report(rows))


if __name__ == "__main__":
    main()
