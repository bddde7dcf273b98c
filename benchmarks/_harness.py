"""Run commands as child processes and measure wall time and peak RSS of each."""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

GNU_TIME = "/usr/bin/time"


@dataclass(frozen=True)
class Run:
    """One command's figures: best wall time, median wall time, peak RSS of its runs.

    ``times`` holds every timed run's wall time, in the order they ran.
    """

    seconds: float
    peak_rss_mib: float
    median: float = 0.0
    times: tuple[float, ...] = ()


@dataclass(frozen=True)
class Step:
    """A command for :func:`alternate`: its argv, the file it writes, what to do first."""

    argv: list[str]
    output: str | None = None
    prepare: Callable[[], None] | None = None


def measure(
    argv: list[str], output: str | None = None, prepare: Callable[[], None] | None = None
) -> Run:
    """Run ``argv`` to completion; raise if it fails.

    ``prepare`` runs first, untimed (an in-place operation gets a fresh copy of its input).

    ``output`` (the file the command writes) is removed first, untimed: freeing the
    previous run's gigabyte is not part of either tool's work (qemu-img truncates an
    existing target, qcowlib renames over it; both would pay the file system for it).

    Peak RSS comes from GNU time (``%M``): a child forked from this Python process would
    report this process's RSS as its own high-water mark.  Dirty pages left by the
    previous run are written back first (not timed), so that one run's writeback does
    not throttle the next.
    """
    if not os.access(GNU_TIME, os.X_OK):
        raise SystemExit("benchmarks need GNU time: apt-get install time")
    if output is not None and os.path.lexists(output):
        os.unlink(output)
    if prepare is not None:
        prepare()
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


def best_of(argv: list[str], repeat: int, output: str | None = None) -> Run:
    """The fastest of ``repeat`` runs after one warm-up run (page cache)."""
    measure(argv, output)
    return _summary([measure(argv, output) for _ in range(repeat)])


def paired(
    ref: list[str],
    ours: list[str],
    repeat: int,
    output: str | None = None,
    prepare: Callable[[], None] | None = None,
) -> tuple[Run, Run]:
    """Both commands ``repeat`` times, alternating, after one warm-up run of each.

    This machine's write path is bimodal (the same copy takes 0.35 s or 1-4 s from one
    run to the next, for either tool), so the runs alternate: a slow spell hits both
    sides instead of all the runs of one.  The report gives the ratio of the best runs
    and the ratio of the medians.
    """
    ref_run, our_run = alternate([Step(ref, output, prepare), Step(ours, output, prepare)], repeat)
    return ref_run, our_run


def alternate(steps: Sequence[Step], repeat: int) -> list[Run]:
    """Every step once as a warm-up, then ``repeat`` rounds of every step in turn.

    The steps run in the given order within each round, so a step may read what an
    earlier step of the same round wrote (a copy-limit step copying the reference's
    output, say).  Returns one summary per step, in the same order.
    """
    for step in steps:
        measure(step.argv, step.output, step.prepare)
    runs: list[list[Run]] = [[] for _ in steps]
    for _ in range(repeat):
        for step, step_runs in zip(steps, runs, strict=True):
            step_runs.append(measure(step.argv, step.output, step.prepare))
    return [_summary(step_runs) for step_runs in runs]


def _summary(runs: list[Run]) -> Run:
    return Run(
        min(r.seconds for r in runs),
        max(r.peak_rss_mib for r in runs),
        statistics.median(r.seconds for r in runs),
        tuple(r.seconds for r in runs),
    )


@functools.cache
def _prepare_qcowlib() -> None:
    """Compile qcowlib's bytecode and make children import the same qcowlib as this process.

    ``PYTHONPATH`` is made absolute, with the directory this process imported qcowlib
    from first: a relative ``PYTHONPATH=src`` would otherwise depend on the child's
    working directory, and without it a child would find whatever copy the virtual
    environment has installed (an editable install of another checkout, say).
    """
    import compileall

    import qcowlib

    package = os.path.dirname(os.path.abspath(qcowlib.__file__))
    compileall.compile_dir(package, quiet=1)
    entries = [os.path.dirname(package)]
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and os.path.abspath(entry) not in entries:
            entries.append(os.path.abspath(entry))
    os.environ["PYTHONPATH"] = os.pathsep.join(entries)


def qcowlib_cmd(*args: str) -> list[str]:
    """``python -m qcowlib ARGS`` running the qcowlib this process imports, bytecode compiled.

    An installed package ships its ``.pyc`` files; a source checkout run with
    ``PYTHONDONTWRITEBYTECODE`` would compile every module on every run (~0.1 s here),
    which is not what users pay.
    """
    _prepare_qcowlib()
    return [sys.executable, "-m", "qcowlib", *args]


def python_pass_cmd() -> list[str]:
    """``python -c pass`` of the interpreter and environment that :func:`qcowlib_cmd` uses."""
    _prepare_qcowlib()
    return [sys.executable, "-c", "pass"]


def convert_args(doc: str | None) -> argparse.Namespace:
    """The options of the convert-style benchmarks: input shape, repeats, where, which."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--data", default="1G")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--only", default=None, help="run only cases whose name contains this")
    return parser.parse_args()


def require_qemu() -> None:
    if shutil.which("qemu-img") is None:
        raise SystemExit("benchmarks need qemu-img: apt-get install qemu-utils")


def report(rows: list[tuple[str, Run, Run]]) -> str:
    """A table: case, best times of both, ratio of best and of median times, peak RSS."""
    lines = [
        f"{'case':<36}{'qemu-img s':>11}{'qcowlib s':>11}{'ratio':>8}{'median':>8}"
        f"{'qemu RSS MiB':>14}{'qcowlib RSS MiB':>17}"
    ]
    for name, ref, ours in rows:
        median = f"{ours.median / ref.median:>8.2f}" if ref.median and ours.median else f"{'':>8}"
        lines.append(
            f"{name:<36}{ref.seconds:>11.3f}{ours.seconds:>11.3f}"
            f"{ours.seconds / ref.seconds:>8.2f}{median}"
            f"{ref.peak_rss_mib:>14.1f}{ours.peak_rss_mib:>17.1f}"
        )
    return "\n".join(lines)
