"""Draw the ratios of a :mod:`benchmarks.bench_engine` ``--json`` file as grouped bars.

    PYTHONPATH=src .venv/bin/python -m benchmarks.plot FILE.json docs/perf-ratios.png

Per operation, two bars: qcowlib/qemu-img and qcowlib/floor (the copy limit for cases
that move data, ``python -c pass`` for metadata-only ones), both ratios of median times,
on a logarithmic axis with a line at 1.0 and a mark at each target of issue #11.
Needs matplotlib (the ``bench`` dependency group: ``uv pip install --group bench``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASES = ("qemu-img", "floor")
COLOURS = {"qemu-img": "#4c72b0", "floor": "#dd8452"}
FLOOR_SHORT = {"copy limit": "copy", "python -c pass": "py -c pass"}


@dataclass(frozen=True)
class Bars:
    """One operation's ratios and targets, as read from the JSON file."""

    title: str
    floor_kind: str
    ratios: dict[str, float]
    targets: list[tuple[str, float]]


def load(path: Path) -> tuple[dict[str, Any], list[Bars]]:
    """The file's ``meta`` object and one :class:`Bars` per case, in the file's order."""
    data = json.loads(path.read_text())
    bars = [
        Bars(
            title=str(case["title"]),
            floor_kind=str(case["floor_kind"]),
            ratios={b: float(case["ratios"][b]["median"]) for b in BASES},
            targets=[(str(t["basis"]), float(t["limit"])) for t in case["targets"]],
        )
        for case in data["cases"]
    ]
    return dict(data["meta"]), bars


def draw(meta: dict[str, Any], bars: list[Bars], out: Path) -> None:
    """Write the chart to ``out`` (PNG by its suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.38
    fig, ax = plt.subplots(figsize=(max(8.0, 1.05 * len(bars) + 1.5), 5.0), dpi=100)
    for i, basis in enumerate(BASES):
        xs = [n + (i - 0.5) * width for n in range(len(bars))]
        values = [b.ratios[basis] for b in bars]
        label = "qcowlib / qemu-img" if basis == "qemu-img" else "qcowlib / floor"
        ax.bar(xs, values, width, label=label, color=COLOURS[basis])
        for x, v in zip(xs, values, strict=True):
            ax.annotate(f"{v:.2g}", (x, v), ha="center", va="bottom", fontsize=7)
        marks = [
            (x, limit)
            for x, b in zip(xs, bars, strict=True)
            for t, limit in b.targets
            if t == basis
        ]
        if marks:
            ax.scatter(
                [x for x, _ in marks], [y for _, y in marks], marker="_", s=500, linewidths=2.5,
                color="black", zorder=3, label="target",
            )  # fmt: skip
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    top = max(max(b.ratios.values()) for b in bars)
    low = min(min(b.ratios.values()) for b in bars)
    ticks = [2.0**k for k in range(-6, 8) if low / 2 <= 2.0**k <= top * 2]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_ylabel("ratio of median times (lower is better)")
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels(
        [f"{b.title}\n(floor: {FLOOR_SHORT.get(b.floor_kind, b.floor_kind)})" for b in bars],
        rotation=35,
        ha="right",
        fontsize=8,
    )
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left")
    ax.set_title(
        f"qcowlib ratios, medians of {meta.get('repeat')} alternating runs "
        f"({meta.get('metadata_repeat')} for metadata-only commands)\n"
        f"{str(meta.get('date', ''))[:10]}, commit {meta.get('commit')}, "
        f"{meta.get('cpus')} cores",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("json_file", type=Path, help="written by bench_engine --json")
    parser.add_argument("png", type=Path, help="the chart to write")
    args = parser.parse_args()
    meta, bars = load(args.json_file)
    if not bars:
        parser.error(f"{args.json_file}: no cases")
    draw(meta, bars, args.png)


if __name__ == "__main__":
    main()
