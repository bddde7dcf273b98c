"""tools/fuzz: a short, seeded campaign over every format finds no defect.

The long campaigns run by hand (``tools/fuzz --seconds 600``); what they find becomes a
case in ``tests/disk/test_fuzz_regressions.py``.  Here a fixed seed keeps the run
repeatable, and a planted defect shows that the tool reports one.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from tools import fuzz

ROOT = Path(__file__).resolve().parents[1]


def test_seeded_campaign_finds_no_defect(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "fuzz.py"),
            "--cases",
            "30",
            "--seed",
            "7",
            "--out",
            str(tmp_path / "defects"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "30 cases, 0 defects (seed 7)" in res.stdout
    assert not list((tmp_path / "defects").iterdir())


def test_mutation_is_seeded_and_changes_bytes() -> None:
    data = bytes(range(256)) * 512
    a = [fuzz.mutate(data, random.Random(3)) for _ in range(2)]
    assert a[0] == a[1]
    outs = {fuzz.mutate(data, random.Random(s)) for s in range(50)}
    assert len(outs) >= 45


def test_a_defect_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "x.img"
    bad.write_bytes(b"\0" * 4096)

    def explode(path: str) -> None:
        raise ValueError(f"planted in {path}")

    monkeypatch.setattr(fuzz, "exercise", explode)
    report = fuzz.one_case(bad)
    assert report is not None and "ValueError: planted in" in report
