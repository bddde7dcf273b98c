"""qcowlib vs qemu-img vs the copy limit on the shapes users have (issue #11, item 7).

    PYTHONPATH=src .venv/bin/python -m benchmarks.bench_engine \\
        [--dir DIR] [--repeat 5] [--only KEY[,KEY...]] [--json FILE] [--list]

Inputs (:mod:`benchmarks._engine_inputs`, made once by qemu-img/qemu-io, cached in
``DIR/inputs`` when ``--dir`` is given): a fragmented 3-deep qcow2 chain on a 1 GiB base
of mixed random and text data, the chain flattened by qemu-img to qcow2, raw and
compressed qcow2, a small qcow2, and a 1 TiB qcow2 with exactly 1,024 L2 tables.
Optional cases, run only when ``--only`` names them (``--only qed,parallels,qcow1``),
convert fragmented 256 MiB QED, Parallels and qcow (v1) images to raw and qcow2
(:mod:`benchmarks._clustermap_inputs`, cached in ``DIR/clustermap-inputs``).

Every case runs three commands, alternating, one warm-up each and then ``--repeat``
rounds (metadata-only cases, which take milliseconds, ``4 * --repeat`` rounds):
qemu-img, qcowlib, and a floor.  For a case that moves data the floor is the copy limit
for the same bytes: ``cat`` of the input files to /dev/null, then ``cp --sparse=always``
of qemu-img's result of the same round and ``sync -d`` of the copy (both tools flush
their output too: qemu-img runs with ``-t writeback``).  For a metadata-only case the
floor is ``python -c pass`` of the interpreter that runs qcowlib.  The report gives
median times, the ratios qcowlib/qemu-img and qcowlib/floor of the medians, each
side's peak RSS (GNU time ``%M``), and PASS or MISS for every target of the issue;
``--json`` writes all of it, with every run's time, for :mod:`benchmarks.plot`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from benchmarks import _clustermap_inputs
from benchmarks._clustermap_inputs import ClusterMapInputs
from benchmarks._engine_inputs import RECIPE, Inputs, build, inputs_in
from benchmarks._harness import Run, Step, alternate, python_pass_cmd, qcowlib_cmd, require_qemu

Basis = Literal["qemu-img", "floor"]
RSS_TARGET_MIB = 128.0
METADATA_REPEAT_FACTOR = 4
COPY_LIMIT = (
    'res=$1; out=$2; shift 2; cat -- "$@" >/dev/null'
    ' && cp --sparse=always -- "$res" "$out" && sync -d -- "$out"'
)
COPY_FLOOR = "copy limit"
PYTHON_FLOOR = "python -c pass"


@dataclass(frozen=True)
class Target:
    """The issue's target for one case: qcowlib's median over the basis's, at most ``limit``."""

    basis: Basis
    limit: float


@dataclass(frozen=True)
class Case:
    """One operation: the three commands, the files they write, the targets."""

    key: str
    title: str
    qemu: list[str]
    qcowlib: list[str]
    floor: list[str]
    floor_kind: str
    outputs: tuple[str | None, str | None, str | None]
    targets: tuple[Target, ...] = ()
    #: Run only when ``--only`` names it (its inputs are built only then).
    optional: bool = False

    @property
    def metadata(self) -> bool:
        return self.floor_kind == PYTHON_FLOOR


@dataclass(frozen=True)
class Result:
    """A case's three summaries."""

    case: Case
    qemu: Run
    qcowlib: Run
    floor: Run

    def ratio(self, basis: Basis, best: bool = False) -> float:
        """qcowlib's median (or best) time over the basis's."""
        ref = self.qemu if basis == "qemu-img" else self.floor
        if best:
            return self.qcowlib.seconds / ref.seconds
        return self.qcowlib.median / ref.median


def copy_limit(inputs: list[Path], result: str, copy: str) -> list[str]:
    """``cat INPUTS >/dev/null && cp --sparse=always RESULT COPY && sync -d COPY``."""
    return ["sh", "-c", COPY_LIMIT, "copy-limit", result, copy, *map(str, inputs)]


def cases(inp: Inputs, out: Path, frag: ClusterMapInputs | None = None) -> list[Case]:
    """Every case of the benchmark, outputs under ``out`` (with ``frag``, the optional
    cluster-map format cases too)."""

    def data(
        key: str,
        title: str,
        inputs: list[Path],
        qemu_args: list[str],
        ours_args: list[str],
        ext: str,
        limit: float,
        optional: bool = False,
    ) -> Case:
        q, o, c = (str(out / f"{key}.{who}.{ext}") for who in ("qemu-img", "qcowlib", "copy"))
        return Case(
            key,
            title,
            ["qemu-img", "convert", "-t", "writeback", *qemu_args, q],
            qcowlib_cmd(*ours_args, o),
            copy_limit(inputs, q, c),
            COPY_FLOOR,
            (q, o, c),
            (Target("qemu-img", limit),),
            optional,
        )

    def meta(key: str, title: str, qemu: list[str], ours: list[str], target: Target | None) -> Case:
        targets = (target,) if target else ()
        return Case(
            key, title, qemu, qcowlib_cmd(*ours), python_pass_cmd(), PYTHON_FLOOR,
            (None, None, None), targets,
        )  # fmt: skip

    extra = _clustermap_cases(frag, data, meta) if frag is not None else []
    top, flat, raw, zlib = (
        str(p) for p in (inp.overlay2, inp.flat_qcow2, inp.flat_raw, inp.flat_zlib)
    )
    small, big = str(inp.small), str(inp.big)
    stream = ["-O", "vmdk", "-o", "subformat=streamOptimized"]
    return [
        data("flatten", "flatten chain -> qcow2", inp.chain,
             ["-O", "qcow2", top], ["flatten", top], "qcow2", 1.0),
        data("flatten-c", "flatten chain -> qcow2 -c", inp.chain,
             ["-c", "-O", "qcow2", top], ["flatten", "-c", top], "qcow2", 0.6),
        data("qcow2-raw", "qcow2 -> raw", [inp.flat_qcow2],
             ["-O", "raw", flat], ["convert", "-O", "raw", flat], "raw", 1.0),
        data("raw-qcow2", "raw -> qcow2", [inp.flat_raw],
             ["-f", "raw", "-O", "qcow2", raw], ["convert", "-f", "raw", "-O", "qcow2", raw],
             "qcow2", 1.0),
        data("zlib-raw", "compressed qcow2 -> raw", [inp.flat_zlib],
             ["-O", "raw", zlib], ["convert", "-O", "raw", zlib], "raw", 1.0),
        data("vmdk-stream", "qcow2 -> vmdk streamOptimized", [inp.flat_qcow2],
             [*stream, flat], ["convert", *stream, flat], "vmdk", 0.5),
        meta("info-small", "info small qcow2", ["qemu-img", "info", small],
             ["info", small], Target("floor", 4.0)),
        meta("validate-small", "validate small qcow2", ["qemu-img", "info", small],
             ["validate", small], Target("floor", 4.0)),
        meta("map-small", "map small qcow2", ["qemu-img", "map", "--output", "json", small],
             ["map", "--output", "json", small], None),
        meta("check-small", "check small qcow2", ["qemu-img", "check", small],
             ["check", small], None),
        meta("info-1t", "info 1 TiB, 1,024 L2", ["qemu-img", "info", big],
             ["info", big], Target("qemu-img", 8.0)),
        meta("map-1t", "map 1 TiB, 1,024 L2", ["qemu-img", "map", "--output", "json", big],
             ["map", "--output", "json", big], None),
        meta("check-1t", "check 1 TiB, 1,024 L2", ["qemu-img", "check", big],
             ["check", big], None),
        *extra,
    ]  # fmt: skip


def _clustermap_cases(
    frag: ClusterMapInputs, data: Callable[..., Case], meta: Callable[..., Case]
) -> list[Case]:
    """QED (4 KiB and 64 KiB clusters), Parallels and qcow (v1) -> raw and -> qcow2,
    fragmented, and a raw file of scattered 4 KiB blocks -> raw
    (:mod:`benchmarks._clustermap_inputs`); the same writes as VMDK (monolithicSparse
    and streamOptimized), VDI, VHD and VHDX -> raw, -> qcow2 and ``map --output json``
    (keys ``frag-*``); run only when ``--only`` names them."""
    out: list[Case] = []
    for key, path in (
        ("vmdk", frag.vmdk),
        ("vmdkstream", frag.vmdk_stream),
        ("vdi", frag.vdi),
        ("vhd", frag.vhd),
        ("vhdx", frag.vhdx),
    ):
        for fmt in ("raw", "qcow2"):
            args = ["-O", fmt, str(path)]
            out.append(data(f"frag-{key}-{fmt}", f"{path.name} -> {fmt}", [path], args,
                            ["convert", *args], fmt, 1.0, True))  # fmt: skip
        m = ["map", "--output", "json", str(path)]
        out.append(
            replace(meta(f"frag-{key}-map", f"map {path.name}", ["qemu-img", *m], m, None),
                    optional=True)
        )  # fmt: skip
    for key, path in (
        ("qed4k", frag.qed_4k),
        ("qed64k", frag.qed_64k),
        ("parallels", frag.parallels),
        ("qcow1", frag.qcow),
    ):
        for fmt in ("raw", "qcow2"):
            title = f"{path.name} -> {fmt}"
            args = ["-O", fmt, str(path)]
            out.append(
                data(f"{key}-{fmt}", title, [path], args, ["convert", *args], fmt, 1.0, True)
            )
    raw = ["-f", "raw", "-O", "raw", str(frag.scattered_raw)]
    title = "scattered.raw (200,000 x 4 KiB) -> raw"
    out.append(data("scattered-raw", title, [frag.scattered_raw], raw, ["convert", *raw], "raw",
                    1.0, True))  # fmt: skip
    return out


def selected(all_cases: list[Case], only: str | None) -> list[Case]:
    """The cases named by the comma-separated words of ``only``.

    A word that is a case's key selects that case; any other word selects every case
    whose key contains it (``1t`` selects info-1t, map-1t and check-1t).
    """
    if not only:
        return [c for c in all_cases if not c.optional]
    keys = {c.key for c in all_cases}
    words = [w for w in only.split(",") if w]
    exact = {w for w in words if w in keys}
    loose = [w for w in words if w not in keys]
    return [c for c in all_cases if c.key in exact or any(w in c.key for w in loose)]


def run_case(case: Case, repeat: int) -> Result:
    rounds = repeat * METADATA_REPEAT_FACTOR if case.metadata else repeat
    steps = [
        Step(argv, output)
        for argv, output in zip((case.qemu, case.qcowlib, case.floor), case.outputs, strict=True)
    ]
    try:
        qemu, ours, floor = alternate(steps, rounds)
    finally:
        for output in case.outputs:
            if output is not None and os.path.lexists(output):
                os.unlink(output)
    return Result(case, qemu, ours, floor)


def verdicts(result: Result) -> list[tuple[str, bool]]:
    """One line and a pass flag per target of the case, peak RSS included."""
    lines: list[tuple[str, bool]] = []
    for target in result.case.targets:
        basis = "qemu-img" if target.basis == "qemu-img" else result.case.floor_kind
        value = result.ratio(target.basis)
        ok = value <= target.limit
        lines.append((f"{result.case.title}: qcowlib/{basis} {value:.2f} <= {target.limit}", ok))
    rss = result.qcowlib.peak_rss_mib
    lines.append(
        (
            f"{result.case.title}: peak RSS {rss:.1f} MiB <= {RSS_TARGET_MIB:.0f}",
            rss <= RSS_TARGET_MIB,
        )
    )
    return lines


def report(results: list[Result]) -> str:
    """Median times, ratios of the medians, peak RSS, then PASS/MISS per target."""
    lines = [
        f"{'case':<32}{'qemu-img s':>11}{'qcowlib s':>11}{'floor s':>9}  {'floor':<15}"
        f"{'/qemu-img':>10}{'/floor':>8}{'RSS qemu':>10}{'RSS ours':>10}"
    ]
    for r in results:
        lines.append(
            f"{r.case.title:<32}{r.qemu.median:>11.3f}{r.qcowlib.median:>11.3f}"
            f"{r.floor.median:>9.3f}  {r.case.floor_kind:<15}{r.ratio('qemu-img'):>10.2f}"
            f"{r.ratio('floor'):>8.2f}{r.qemu.peak_rss_mib:>10.1f}{r.qcowlib.peak_rss_mib:>10.1f}"
        )
    lines += ["", "targets (ratios of median times; qcowlib's peak RSS):"]
    for r in results:
        lines += [f"  {'PASS' if ok else 'MISS'}  {text}" for text, ok in verdicts(r)]
    return "\n".join(lines)


def _run_json(run: Run) -> dict[str, object]:
    return {
        "best": run.seconds,
        "median": run.median,
        "peak_rss_mib": run.peak_rss_mib,
        "times": list(run.times),
    }


def _case_json(r: Result) -> dict[str, object]:
    bases: tuple[Basis, Basis] = ("qemu-img", "floor")
    return {
        "key": r.case.key,
        "title": r.case.title,
        "floor_kind": r.case.floor_kind,
        "commands": {"qemu-img": r.case.qemu, "qcowlib": r.case.qcowlib, "floor": r.case.floor},
        "runs": {
            "qemu-img": _run_json(r.qemu),
            "qcowlib": _run_json(r.qcowlib),
            "floor": _run_json(r.floor),
        },
        "ratios": {b: {"median": r.ratio(b), "best": r.ratio(b, best=True)} for b in bases},
        "targets": [
            {
                "basis": t.basis,
                "limit": t.limit,
                "value": r.ratio(t.basis),
                "pass": r.ratio(t.basis) <= t.limit,
            }
            for t in r.case.targets
        ],
        "rss_target": {
            "limit_mib": RSS_TARGET_MIB,
            "value_mib": r.qcowlib.peak_rss_mib,
            "pass": r.qcowlib.peak_rss_mib <= RSS_TARGET_MIB,
        },
    }


def to_json(results: list[Result], meta: dict[str, object]) -> dict[str, object]:
    """Everything measured: where, the commands, every run's time, ratios and verdicts."""
    return {"meta": meta, "cases": [_case_json(r) for r in results]}


def _stdout(*argv: str) -> str:
    """A helper command's output, or "" when it fails."""
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def machine(repeat: int) -> dict[str, object]:
    """Where and what was measured: date, commit, interpreter, qemu-img, cores, memory."""
    import qcowlib

    src = os.path.dirname(os.path.abspath(qcowlib.__file__))
    commit = _stdout("git", "-C", src, "rev-parse", "--short", "HEAD")
    dirty = _stdout("git", "-C", src, "status", "--porcelain", "--", ".")
    qemu = _stdout("qemu-img", "--version")
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit + ("+dirty" if dirty else ""),
        "qcowlib": src,
        "python": sys.version.split()[0],
        "qemu_img": qemu.splitlines()[0] if qemu else "",
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "repeat": repeat,
        "metadata_repeat": repeat * METADATA_REPEAT_FACTOR,
        "inputs": RECIPE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dir", default=None, help="keep inputs in DIR/inputs (built once)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds per case (>= 5)")
    parser.add_argument("--only", default=None, help="comma-separated words in case keys")
    parser.add_argument("--json", default=None, metavar="FILE", help="write all figures here")
    parser.add_argument("--list", action="store_true", help="list the case keys and exit")
    args = parser.parse_args()
    if args.list:
        frag = _clustermap_inputs.inputs_in(Path())
        for case in cases(inputs_in(Path()), Path(), frag):
            print(f"{case.key:<16}{case.title}{' (optional)' if case.optional else ''}")
        return
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    require_qemu()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-engine-") as tmp:
        root = Path(args.dir) if args.dir else Path(tmp)
        frag_dir = root / "clustermap-inputs"
        planned = cases(
            inputs_in(root / "inputs"), Path(tmp), _clustermap_inputs.inputs_in(frag_dir)
        )
        todo = selected(planned, args.only)
        if not todo:
            parser.error(f"--only {args.only}: no case key matches (see --list)")
        # Each set of inputs is made only when a chosen case reads it.
        if any(not c.optional for c in todo):
            build(root / "inputs")
        if any(c.optional for c in todo):
            _clustermap_inputs.build(frag_dir)
        meta = machine(args.repeat)
        results: list[Result] = []
        for case in todo:
            print(f"running {case.key}", file=sys.stderr, flush=True)
            results.append(run_case(case, args.repeat))
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(results, meta), f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
