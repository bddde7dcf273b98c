"""Third-party rules: :func:`qcowlib.validate.register` and the ``qcowlib.validators``
entry-point group, with the example package in ``tests/validate/hookpkg``."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcowlib.errors import InvalidArgument
from qcowlib.validate import (
    MAX_READ,
    Context,
    Finding,
    Rule,
    all_rules,
    builtin_rules,
    register,
    registered_rules,
    reload_entry_points,
    rule,
    unregister,
    validate,
)
from qcowlib.validate.model import valid_rule_id
from tests.validate.images import create

pytestmark = pytest.mark.usefixtures("qemu")

HOOKPKG = Path(__file__).resolve().parent / "hookpkg"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def v2_and_v3(tmp_path: Path) -> tuple[Path, Path]:
    v2 = create(tmp_path / "old.qcow2", "qcow2", "1M", "compat=0.10")
    v3 = create(tmp_path / "new.img", "qcow2", "1M")
    return v2, v3


@pytest.fixture
def clean_entry_points() -> Iterator[None]:
    reload_entry_points()
    yield
    sys.modules.pop("qcowlib_hook_example", None)
    reload_entry_points()


def test_register_rule_and_callable(v2_and_v3: tuple[Path, Path]) -> None:
    v2, v3 = v2_and_v3

    @rule("test-no-v2", formats=["qcow2"])
    def no_v2(ctx: Context) -> Iterator[Finding]:
        """qcow2 v2 is refused here."""
        if ctx.qcow2_fields().version == 2:
            yield ctx.error("version 2", offset=4)

    def big(ctx: Context) -> list[Finding]:
        return [ctx.warning("big")] if ctx.size > 0 else []

    big.rule_id = "test-size"  # type: ignore[attr-defined]
    assert no_v2.description == "qcow2 v2 is refused here."
    register(no_v2)
    registered = register(big)
    try:
        assert isinstance(registered, Rule) and registered.id == "test-size"
        report = validate(v2)
        assert [f.to_json() for f in report.errors] == [
            {"rule": "test-no-v2", "severity": "error", "message": "version 2", "offset": 4}
        ]
        assert {f.rule for f in report.warnings} == {"test-size"}
        assert validate(v3).ok
        with pytest.raises(InvalidArgument):
            register(no_v2)
        register(no_v2, replace=True)
        assert no_v2 in registered_rules()
    finally:
        unregister(no_v2)
        unregister("test-size")
    assert validate(v2).ok
    with pytest.raises(InvalidArgument):
        unregister("test-size")


def test_register_refuses_builtin_ids_and_bad_rules() -> None:
    with pytest.raises(InvalidArgument):
        register(Rule("backing-file", lambda ctx: None))
    with pytest.raises(InvalidArgument):
        Rule("bad id with spaces", lambda ctx: None)
    with pytest.raises(InvalidArgument):
        register(42)
    assert {r.id for r in builtin_rules()} >= {
        "structure",
        "backing-file",
        "data-file",
        "unknown-features",
        "format-match",
        "vmdk-create-type",
        "vmdk-extent",
        "mbr",
        "check",
    }


def test_broken_rules_reject_instead_of_crashing(v2_and_v3: tuple[Path, Path]) -> None:
    v2, _ = v2_and_v3

    def explodes(ctx: Context) -> list[Finding]:
        raise RuntimeError("boom")

    def wrong_type(ctx: Context) -> list[str]:
        return ["not a finding"]

    def reads_too_much(ctx: Context) -> list[Finding]:
        ctx.read(0, MAX_READ + 1)
        return []

    report = validate(
        v2,
        rules=[Rule("explodes", explodes), Rule("wrong-type", wrong_type)],  # type: ignore[arg-type]
    )
    assert {f.rule for f in report.errors} == {"explodes", "wrong-type"}
    assert all(f.structural for f in report.errors)
    assert "boom" in report.errors[0].message
    report = validate(v2, extra_rules=[Rule("reads-too-much", reads_too_much)])
    assert {f.rule for f in report.errors} == {"reads-too-much"}
    assert not validate(v2, policy="permissive", extra_rules=[Rule("x", explodes)]).ok


def _fake_install(target: Path, entry_points: str) -> None:
    """What ``pip install`` leaves behind: the module and a dist-info with entry points."""
    shutil.copy(HOOKPKG / "qcowlib_hook_example.py", target)
    info = target / "qcowlib_hook_example-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: qcowlib-hook-example\nVersion: 0.1.0\n"
    )
    (info / "entry_points.txt").write_text(entry_points)


def test_entry_points_from_dist_info(
    v2_and_v3: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clean_entry_points: None,
) -> None:
    v2, v3 = v2_and_v3
    site = tmp_path / "site"
    site.mkdir()
    _fake_install(
        site,
        "[qcowlib.validators]\n"
        "example-qcow2-v3-only = qcowlib_hook_example:qcow2_v3_only\n"
        "example-file-name = qcowlib_hook_example:check_file_name\n",
    )
    monkeypatch.syspath_prepend(str(site))
    reload_entry_points()
    rules, errors = all_rules()
    assert not errors
    assert {"example-qcow2-v3-only", "example-file-name"} <= {r.id for r in rules}

    report = validate(v2)
    assert {f.rule for f in report.errors} == {"example-qcow2-v3-only"}
    assert "compat=1.1" in report.errors[0].message
    report = validate(v3)
    assert report.ok
    assert [f.rule for f in report.warnings] == ["example-file-name"]
    assert "says raw (.img)" in report.warnings[0].message


def test_broken_entry_point_is_a_finding(
    v2_and_v3: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clean_entry_points: None,
) -> None:
    _, v3 = v2_and_v3
    site = tmp_path / "site"
    site.mkdir()
    _fake_install(
        site,
        "[qcowlib.validators]\n"
        "missing = qcowlib_no_such_module:rule\n"
        "clash = qcowlib_hook_example:qcow2_v3_only\n"
        "clash-again = qcowlib_hook_example:qcow2_v3_only\n"
        "not-a-rule = qcowlib_hook_example:EXTENSIONS\n",
    )
    monkeypatch.syspath_prepend(str(site))
    reload_entry_points()
    report = validate(v3, disk_format=None)
    loads = [f for f in report.errors if f.rule == "hook-load"]
    assert len(loads) == 3, report.human()
    text = " ".join(f.message for f in loads)
    assert "qcowlib_no_such_module" in text and "already taken" in text
    assert not report.ok
    assert not validate(v3, policy="permissive").ok


def test_entry_point_module_may_register_on_import(
    v2_and_v3: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clean_entry_points: None,
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "qcowlib_hook_registers.py").write_text(
        "from qcowlib.validate import Rule, register\n"
        "def _warn(ctx):\n"
        "    return [ctx.warning('registered at import')]\n"
        "RULE = register(Rule('test-registers-on-import', _warn))\n"
    )
    info = site / "qcowlib_hook_registers-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qcowlib-hook-registers\n")
    (info / "entry_points.txt").write_text(
        "[qcowlib.validators]\ntest-registers-on-import = qcowlib_hook_registers:RULE\n"
    )
    monkeypatch.syspath_prepend(str(site))
    try:
        report = validate(v2_and_v3[1], disk_format=None)
        assert [f.rule for f in report.findings] == ["test-registers-on-import"]
    finally:
        unregister("test-registers-on-import")
        sys.modules.pop("qcowlib_hook_registers", None)


def test_entry_point_of_installed_package(v2_and_v3: tuple[Path, Path], tmp_path: Path) -> None:
    """Install tests/validate/hookpkg for real (pip, from a temporary copy, into a target
    directory) and run the command line with it importable."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed in this interpreter")
    v2, v3 = v2_and_v3
    src = tmp_path / "hookpkg"
    shutil.copytree(HOOKPKG, src)
    target = tmp_path / "target"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert list(target.glob("qcowlib_hook_example-*.dist-info/entry_points.txt"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT / "src")]))

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "qcowlib", "validate", "--output", "json", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=120,
        )

    old = run(v2)
    assert old.returncode == 1, old.stderr
    out = json.loads(old.stdout)
    assert out["ok"] is False
    assert [f["rule"] for f in out["findings"]] == ["example-qcow2-v3-only"]
    new = run(v3)
    assert new.returncode == 0, new.stderr
    assert [f["rule"] for f in json.loads(new.stdout)["findings"]] == ["example-file-name"]


@given(st.text(alphabet=st.sampled_from("aZ09._:-\n é/"), max_size=70))
def test_rule_ids_are_what_the_documented_pattern_matches(rule_id: str) -> None:
    """1-64 of letters, digits and ``._:-``, starting with a letter or digit (a trailing
    newline included: ``re.match(...$)`` would have let one through)."""
    expected = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", rule_id) is not None
    assert valid_rule_id(rule_id) is expected
    if not expected:
        with pytest.raises(InvalidArgument):
            Rule(rule_id, lambda ctx: None)
