"""Packaging: the license, one version, development tools in dependency groups."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import qcowlib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEV_TOOLS = ("pytest", "hypothesis", "ruff", "mypy", "mkdocs", "matplotlib")


def _names(requirements: list[str | dict[str, str]]) -> set[str]:
    return {re.split(r"[<>=\[; ]", r, maxsplit=1)[0] for r in requirements if isinstance(r, str)}


def test_license_file_is_the_declared_one() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_version_has_one_source() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    path = PYPROJECT["tool"]["hatch"]["version"]["path"]
    assert (ROOT / path).resolve() == Path(qcowlib.__file__).resolve()
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", qcowlib.__version__)


def test_metadata_for_an_index() -> None:
    project = PYPROJECT["project"]
    assert any(
        c.startswith("Programming Language :: Python :: 3.11") for c in project["classifiers"]
    )
    assert "Typing :: Typed" in project["classifiers"]
    assert {"Homepage", "Documentation", "Issues"} <= set(project["urls"])
    assert (ROOT / "src" / "qcowlib" / "py.typed").exists()


def test_development_tools_are_dependency_groups_not_extras() -> None:
    groups = PYPROJECT["dependency-groups"]
    assert {"test", "lint", "docs", "bench"} <= set(groups)
    users_get = _names(PYPROJECT["project"]["dependencies"])
    for extra in PYPROJECT["project"].get("optional-dependencies", {}).values():
        users_get |= _names(extra)
    assert [t for t in DEV_TOOLS if t in users_get] == []
    assert {"pytest", "hypothesis"} <= _names(groups["test"])
    assert {"ruff", "mypy"} <= _names(groups["lint"])
    assert "mkdocs" in _names(groups["docs"])


def test_bootstrap_profiles() -> None:
    """tools/demo installs qcowlib alone; tools/test's bootstrap the groups it runs."""
    bootstrap = (ROOT / "tools" / "bootstrap").read_text()
    demo = re.search(r"^\s+demo\) .*spec=\((.*)\)", bootstrap, re.M)
    dev = re.search(r"^\s+dev\) .*spec=\((.*)\)", bootstrap, re.M)
    assert demo is not None and dev is not None
    assert demo.group(1) == "-e ."
    assert all(f"--group {g}" in dev.group(1) for g in ("test", "lint", "docs"))
    assert 'tools/bootstrap "$profile"' in (ROOT / "tools" / "demo").read_text()
