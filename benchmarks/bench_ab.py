"""Two qcowlib source trees head to head, with qemu-img, on :mod:`bench_engine`'s cases.

    .venv/bin/python -m benchmarks.bench_ab --before OLD/src --after NEW/src \\
        [--dir DIR] [--only KEY[,KEY...]] [--repeat 7]

Each round runs qemu-img, qcowlib from ``--before`` and qcowlib from ``--after`` on the
case (the order rotating from round to round, one warm-up round first) and records each
command's wall time and CPU time (user + system of the child, from ``wait4``): CPU time
is what a change to qcowlib's own work moves, and it is far less noisy than wall time on
a shared machine.  The report gives medians per case.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _clustermap_inputs
from benchmarks._engine_inputs import build, inputs_in
from benchmarks.bench_engine import Case, cases, selected


def _timed(argv: list[str], env: dict[str, str], output: str | None) -> tuple[float, float]:
    """``argv``'s wall and CPU seconds (``output`` removed first, untimed)."""
    if output is not None and os.path.lexists(output):
        os.unlink(output)
    os.sync()
    t0 = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, env, file_actions=[
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
    ])  # fmt: skip
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed")
    return wall, usage.ru_utime + usage.ru_stime


def run(case: Case, before: str, after: str, repeat: int) -> list[tuple[float, float]]:
    """Median (wall, CPU) of qemu-img, qcowlib before, qcowlib after."""
    envs = [dict(os.environ), {**os.environ, "PYTHONPATH": before}]
    envs.append({**os.environ, "PYTHONPATH": after})
    argvs = [case.qemu, case.qcowlib, case.qcowlib]
    outs = [case.outputs[0], case.outputs[1], case.outputs[1]]
    times: list[list[tuple[float, float]]] = [[], [], []]
    for r in range(repeat + 1):
        for k in range(3):
            i = (r + k) % 3
            got = _timed(argvs[i], envs[i], outs[i])
            if r:
                times[i].append(got)
    for out in case.outputs:
        if out is not None and os.path.lexists(out):
            os.unlink(out)
    return [(statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--before", required=True, help="src directory of the old tree")
    parser.add_argument("--after", required=True, help="src directory of the new tree")
    parser.add_argument("--dir", default=None, help="keep inputs in DIR (built once)")
    parser.add_argument("--only", default=None, help="comma-separated words in case keys")
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds per case")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-ab-") as tmp:
        root = Path(args.dir) if args.dir else Path(tmp)
        frag_dir = root / "clustermap-inputs"
        planned = cases(
            inputs_in(root / "inputs"), Path(tmp), _clustermap_inputs.inputs_in(frag_dir)
        )
        todo = selected(planned, args.only)
        if any(not c.optional for c in todo):
            build(root / "inputs")
        if any(c.optional for c in todo):
            _clustermap_inputs.build(frag_dir)
        for tree in (args.before, args.after):  # bytecode, as an installed package ships
            compileall.compile_dir(os.path.join(tree, "qcowlib"), quiet=1)
        print(f"{'case':<30}{'qemu-img':>16}{'before':>16}{'after':>16}   wall s (CPU s)")
        for case in todo:
            print(f"running {case.key}", file=sys.stderr, flush=True)
            cols = run(case, args.before, args.after, args.repeat)
            text = "".join(f"{f'{w:.3f} ({c:.3f})':>16}" for w, c in cols)
            print(f"{case.title:<30}{text}", flush=True)


if __name__ == "__main__":
    main()
