"""qcowlib vs qemu-img on the same seeded input, same run: converts and check.

    .venv/bin/python -m benchmarks.bench_convert [--size 2G] [--data 1G] [--repeat 5]

The input is a 2 GiB virtual disk with about 1 GiB of data scattered over it in runs of
64 KiB to 4 MiB (half incompressible random bytes, half compressible text), as a sparse
raw file and as a qcow2 made from it by qemu-img.  Each row is the best wall time of
``--repeat`` runs of each tool, alternating, after a warm-up, the ratios qcowlib/qemu-img
of the best and of the median times, and each side's peak RSS.
Both tools flush their output (qemu-img with ``-t writeback``; qcowlib always flushes
before renaming its output into place).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._harness import Run, convert_args, paired, qcowlib_cmd, report, require_qemu
from qcowlib._units import parse_size

TEXT = b"The quick brown fox jumps over the lazy dog; qcowlib benchmark data 0123456789.\n"


def make_inputs(directory: Path, size: int, data: int, seed: int = 7) -> tuple[Path, Path]:
    """A sparse raw disk with ``data`` bytes in scattered runs, and its qcow2 twin."""
    rng = np.random.default_rng(seed)
    raw = directory / "input.raw"
    with raw.open("wb") as f:
        f.truncate(size)
        written = 0
        while written < data:
            length = int(rng.integers(1, 64)) * 65536
            start = int(rng.integers(0, (size - length) // 65536)) * 65536
            if rng.random() < 0.5:
                chunk = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
            else:
                chunk = (TEXT * (length // len(TEXT) + 1))[:length]
            f.seek(start)
            f.write(chunk)
            written += length
    qcow2 = directory / "input.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True
    )
    return raw, qcow2


def main() -> None:
    args = convert_args(__doc__)
    require_qemu()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        raw, qcow2 = make_inputs(d, parse_size(args.size), parse_size(args.data))
        out = str(d / "out.qcow2")
        cases: list[tuple[str, list[str], list[str]]] = [
            ("raw->qcow2", ["-f", "raw", "-O", "qcow2", str(raw), out], []),
            ("qcow2->qcow2", ["-f", "qcow2", "-O", "qcow2", str(qcow2), out], []),
            ("qcow2->qcow2 -c zlib", ["-f", "qcow2", "-O", "qcow2", "-c", str(qcow2), out], []),
            (
                "qcow2->qcow2 -c zstd",
                [
                    "-f",
                    "qcow2",
                    "-O",
                    "qcow2",
                    "-c",
                    "-o",
                    "compression_type=zstd",
                    str(qcow2),
                    out,
                ],
                [],
            ),
        ]
        rows: list[tuple[str, Run, Run]] = []
        for name, conv, _ in cases:
            if args.only and args.only not in name:
                continue
            ref, ours = paired(
                ["qemu-img", "convert", "-t", "writeback", *conv],
                qcowlib_cmd("convert", *conv),
                args.repeat,
                out,
            )
            rows.append((name, ref, ours))
        if not args.only or "check" in args.only:
            ref, ours = paired(
                ["qemu-img", "check", str(qcow2)], qcowlib_cmd("check", str(qcow2)), args.repeat
            )
            rows.append(("check", ref, ours))
    print(report(rows))


if __name__ == "__main__":
    main()
