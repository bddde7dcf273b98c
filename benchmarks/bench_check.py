"""``check`` on images with many clusters: qcowlib vs ``qemu-img check``, same image.

    .venv/bin/python -m benchmarks.bench_check [--repeat 5]

Cases: the 2 GiB / 1 GiB-data image of bench_convert's size class (few clusters: process
start-up dominates) and metadata-preallocated images with 4 M and 16 M clusters, where
the refcount work dominates.  A second table times the check alone, as a library call in
this process (``qcowlib.check(path)``, best of ``--repeat``), against the whole qemu-img
process: what remains when Python's and numpy's start-up are not counted.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks._harness import Run, paired, qcowlib_cmd, report, require_qemu

CASES = [
    ("2G, 64k clusters, 1G data", "2G", "cluster_size=65536", True),
    ("16G, 4k clusters, prealloc (4M)", "16G", "cluster_size=4096,preallocation=metadata", False),
    ("1T, 64k clusters, prealloc (16M)", "1T", "cluster_size=65536,preallocation=metadata", False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    require_qemu()
    rows: list[tuple[str, Run, Run]] = []
    calls: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size, opts, fill in CASES:
            img = Path(tmp) / "img.qcow2"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(img), size], check=True
            )
            if fill:
                subprocess.run(
                    ["qemu-io", "-c", "write -P 7 0 1G", str(img)], check=True, capture_output=True
                )
            ref, ours = paired(
                ["qemu-img", "check", str(img)], qcowlib_cmd("check", str(img)), args.repeat
            )
            rows.append((name, ref, ours))
            calls.append((name, ref.seconds, _in_process(img, args.repeat)))
            img.unlink()
    print(report(rows))
    print()
    print(f"{'case':<36}{'qemu-img process s':>20}{'qcowlib.check() s':>19}{'ratio':>8}")
    for name, ref_s, call_s in calls:
        print(f"{name:<36}{ref_s:>20.3f}{call_s:>19.3f}{call_s / ref_s:>8.2f}")


def _in_process(img: Path, repeat: int) -> float:
    """Best time of ``qcowlib.check(img)`` called in this process, after a warm-up."""
    import qcowlib

    qcowlib.check(str(img))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        qcowlib.check(str(img))
        best = min(best, time.perf_counter() - t0)
    return best


if __name__ == "__main__":
    main()
