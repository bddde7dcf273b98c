"""Deep backing chains: qcowlib vs qemu-img converting and flattening N-deep chains.

    .venv/bin/python -m benchmarks.bench_chain [--depth 1000] [--repeat 3]

The chain is ``--depth`` 1 MiB qcow2 images (built as :func:`tests.core.chains.make_chain`
builds it: copies of one overlay with the backing name changed), the base and a few
layers holding data.  qemu-img 7.2 converts 1,000-deep chains (it crashed at 5,000
here); qcowlib opens and reads chains without recursion, capped at 2,048 images.
Cases: ``convert -O raw`` of the top and ``info --backing-chain``; runs alternate (see
:func:`benchmarks._harness.paired`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.core.chains import make_chain

from benchmarks._harness import Run, paired, qcowlib_cmd, report, require_qemu


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--depth", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    require_qemu()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        top = str(make_chain(d / "chain", args.depth))
        out = str(d / "out.raw")
        cases = [
            (f"convert -O raw, {args.depth} deep", ["convert", "-O", "raw", top, out]),
            (f"info --backing-chain, {args.depth} deep", ["info", "--backing-chain", top]),
        ]
        rows: list[tuple[str, Run, Run]] = []
        for name, argv in cases:
            ref, ours = paired(["qemu-img", *argv], qcowlib_cmd(*argv), args.repeat)
            rows.append((name, ref, ours))
    print(report(rows))


if __name__ == "__main__":
    main()
