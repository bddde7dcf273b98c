"""Read a 1 GiB fully allocated qcow2 to raw: qcowlib vs ``qemu-img convert -O raw``.

    .venv/bin/python -m benchmarks.bench_read [--size 1G] [--repeat 5] [--dir DIR]

Both tools read the same seeded input in the same run; the table shows wall time (best
of ``--repeat`` after a warm-up run; qcowlib's runs alternate with qemu-img ``-t
writeback``), the ratios qcowlib/qemu-img of the best and median times and the peak RSS
of each process.  qcowlib flushes its output before renaming it into place; qemu-img's
default cache mode for convert output does not flush, so ``-t writeback`` is shown too.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._harness import Run, best_of, paired, qcowlib_cmd, report, require_qemu
from qcowlib._units import parse_size


def make_input(directory: Path, size: int, seed: int = 1) -> Path:
    """A qcow2 with every cluster allocated: half random bytes, half a repeated pattern."""
    raw = directory / "input.raw"
    rng = np.random.default_rng(seed)
    chunk = 16 << 20
    with raw.open("wb") as f:
        for pos in range(0, size, chunk):
            n = min(chunk, size - pos)
            if (pos // chunk) % 2:
                f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            else:
                f.write((b"qcowlib-benchmark" * (n // 17 + 1))[:n])
    img = directory / "input.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(img)], check=True
    )
    raw.unlink()
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = parser.parse_args()
    require_qemu()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        img = make_input(d, size)
        out = str(d / "out.raw")
        rows: list[tuple[str, Run, Run]] = []
        ref = best_of(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), out], args.repeat, out
        )
        ref_wb, ours = paired(
            ["qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O", "raw", str(img), out],
            qcowlib_cmd("convert", "-f", "qcow2", "-O", "raw", str(img), out),
            args.repeat,
            out,
        )
        rows.append((f"qcow2->raw {args.size} (default)", ref, ours))
        rows.append((f"qcow2->raw {args.size} (-t writeback)", ref_wb, ours))
    print(report(rows))


if __name__ == "__main__":
    main()
