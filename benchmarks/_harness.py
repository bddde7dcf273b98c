"""Run commands as child processes and measure wall time and peak RSS of each."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

GNU_TIME = "/usr/bin/time"


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_rss_mib: float


def measure(argv: list[str]) -> Run:
    """Run ``argv`` to completion; raise if it fails.

    Peak RSS comes from GNU time (``%M``): a child forked from this Python process would
    report this process's RSS as its own high-water mark.  Dirty pages left by the
    previous run are written back first (not timed), so that one run's writeback does
    not throttle the next.
    """
    if not os.access(GNU_TIME, os.X_OK):
        raise SystemExit("benchmarks need GNU time: apt-get install time")
    os.sync()
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        code = subprocess.call([GNU_TIME, "-f", "%M", *argv], stdout=subprocess.DEVNULL, stderr=err)
        elapsed = time.perf_counter() - t0
        err.seek(0)
        lines = err.read().strip().splitlines()
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with status {code}: {lines[-3:]}")
    return Run(elapsed, int(lines[-1]) / 1024)


def best_of(argv: list[str], repeat: int) -> Run:
    """The fastest of ``repeat`` runs after one warm-up run (page cache)."""
    measure(argv)
    runs = [measure(argv) for _ in range(repeat)]
    fastest = min(runs, key=lambda r: r.seconds)
    return Run(fastest.seconds, max(r.peak_rss_mib for r in runs))


def qcowlib_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qcowlib", *args]


def require_qemu() -> None:
    if shutil.which("qemu-img") is None:
        raise SystemExit("benchmarks need qemu-img: apt-get install qemu-utils")


def report(rows: list[tuple[str, Run, Run]]) -> str:
    """A table: case, qemu-img time, qcowlib time, ratio, peak RSS of both."""
    lines = [
        f"{'case':<36}{'qemu-img s':>11}{'qcowlib s':>11}{'ratio':>8}"
        f"{'qemu RSS MiB':>14}{'qcowlib RSS MiB':>17}"
    ]
    for name, ref, ours in rows:
        lines.append(
            f"{name:<36}{ref.seconds:>11.3f}{ours.seconds:>11.3f}"
            f"{ours.seconds / ref.seconds:>8.2f}{ref.peak_rss_mib:>14.1f}{ours.peak_rss_mib:>17.1f}"
        )
    return "\n".join(lines)
