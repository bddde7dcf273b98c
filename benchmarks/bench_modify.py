"""In-place operations: qcowlib vs qemu-img on fresh copies of the same seeded images.

    .venv/bin/python -m benchmarks.bench_modify [--size 2G] [--data 512M] [--repeat 5]

A qcow2 base with ``--data`` bytes in scattered runs and a qcow2 overlay that rewrites a
quarter of them.  Cases: safe ``rebase`` of the overlay onto an empty image (every
cluster where the old and new backing differ is copied in), ``rebase -b ""`` (the whole
backing is pulled in), ``commit`` of the overlay into its base, and ``resize --shrink``
of the base to half its size.  Each run works on a fresh copy made untimed before it;
runs of the two tools alternate (see :func:`benchmarks._harness.paired`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks._harness import Run, paired, qcowlib_cmd, report, require_qemu
from benchmarks.bench_flatten import _fill
from qcowlib._units import parse_size


def make_images(d: Path, size: int, data: int) -> tuple[Path, Path, Path]:
    """``base.qcow2`` with data, ``top.qcow2`` over it, and an empty ``empty.qcow2``."""
    import numpy as np

    rng = np.random.default_rng(5)
    base, top, empty = d / "base.qcow2", d / "top.qcow2", d / "empty.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size)], check=True)
    _fill(base, "qcow2", size, data, rng)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top)],
        check=True,
    )
    _fill(top, "qcow2", size, data // 4, rng)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(empty), str(size)], check=True)
    return base, top, empty


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--data", default="512M")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default=None, help="run only cases whose name contains this")
    args = parser.parse_args()
    require_qemu()
    size = parse_size(args.size)
    data = parse_size(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        base, top, empty = make_images(d, size, data)
        work_base, work_top = d / "work-base.qcow2", d / "work-top.qcow2"

        def fresh_top() -> None:
            shutil.copyfile(top, work_top)

        def fresh_pair() -> None:
            shutil.copyfile(base, work_base)
            shutil.copyfile(top, work_top)
            subprocess.run(
                ["qemu-img", "rebase", "-u", "-b", work_base.name, "-F", "qcow2", str(work_top)],
                check=True,
            )

        def fresh_base() -> None:
            shutil.copyfile(base, work_base)

        wt, wb = str(work_top), str(work_base)
        onto_empty = ["rebase", "-b", empty.name, "-F", "qcow2", wt]
        cases = [
            ("rebase onto an empty base", onto_empty, fresh_top),
            ('rebase -b "" (pull the base in)', ["rebase", "-b", "", wt], fresh_top),
            ("commit overlay into base", ["commit", wt], fresh_pair),
            ("resize --shrink to half", ["resize", "--shrink", wb, str(size // 2)], fresh_base),
        ]
        rows: list[tuple[str, Run, Run]] = []
        for name, argv, prepare in cases:
            if args.only and args.only not in name:
                continue
            ref, ours = paired(
                ["qemu-img", *argv[:1], "-q", *argv[1:]],
                qcowlib_cmd(*argv),
                args.repeat,
                prepare=prepare,
            )
            rows.append((name, ref, ours))
    print(report(rows))


if __name__ == "__main__":
    main()
