"""qcowlib vs qemu-img converting to VMDK, VDI, VHD and VHDX, same seeded input, same run.

    .venv/bin/python -m benchmarks.bench_formats [--size 2G] [--data 1G] [--repeat 5]

The input is the one of :mod:`benchmarks.bench_convert` (a 2 GiB virtual disk with about
1 GiB of scattered data, half random, half text) as raw and as qcow2.  Rows: qcow2 to
streamOptimized VMDK (every grain deflated; issue target: at most 0.5 of qemu-img's
time), qcow2 to monolithicSparse VMDK, raw to dynamic and static VDI, raw to dynamic VHD
and to dynamic VHDX.  Each row is the best wall time of ``--repeat`` runs of each
tool (alternating, after a warm-up), the ratios qcowlib/qemu-img of the best and of the
median times and each side's peak RSS; both tools flush their output (qemu-img with
``-t writeback``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks._harness import Run, convert_args, paired, qcowlib_cmd, report, require_qemu
from benchmarks.bench_convert import make_inputs
from qcowlib._units import parse_size


def main() -> None:
    args = convert_args(__doc__)
    require_qemu()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        raw, qcow2 = make_inputs(d, parse_size(args.size), parse_size(args.data))
        cases: list[tuple[str, list[str]]] = [
            (
                "qcow2->vmdk streamOptimized",
                ["-f", "qcow2", "-O", "vmdk", "-o", "subformat=streamOptimized", str(qcow2)],
            ),
            (
                "qcow2->vmdk monolithicSparse",
                ["-f", "qcow2", "-O", "vmdk", "-o", "subformat=monolithicSparse", str(qcow2)],
            ),
            ("raw->vdi", ["-f", "raw", "-O", "vdi", str(raw)]),
            ("raw->vdi static", ["-f", "raw", "-O", "vdi", "-o", "static=on", str(raw)]),
            ("raw->vpc dynamic", ["-f", "raw", "-O", "vpc", str(raw)]),
            ("raw->vhdx dynamic", ["-f", "raw", "-O", "vhdx", str(raw)]),
        ]
        rows: list[tuple[str, Run, Run]] = []
        for name, conv in cases:
            if args.only and args.only not in name:
                continue
            out = str(d / f"out.{conv[3]}")
            ref, ours = paired(
                ["qemu-img", "convert", "-t", "writeback", *conv, out],
                qcowlib_cmd("convert", *conv, out),
                args.repeat,
                out,
            )
            rows.append((name, ref, ours))
    print(report(rows))


if __name__ == "__main__":
    main()
