"""The documentation's generated pages cover what the program has (the site itself is
built with ``mkdocs build --strict`` by tools/test)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import qcowlib
from qcowlib.cli import COMMANDS
from qcowlib.validate.rules import BUILTIN_RULES

ROOT = Path(__file__).resolve().parents[1]


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "tools" / "docs_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_has_every_command_and_option() -> None:
    text = _hooks().cli_reference()
    for name in COMMANDS:
        assert f"\n## {name}\n" in text
    assert "`--output`" in text and "`--backing-chain`" in text


def test_formats_and_rules_pages_list_the_registry_and_the_rules() -> None:
    hooks = _hooks()
    table = hooks.formats_table()
    assert all(f"| `{f.name}` |" in table for f in qcowlib.formats())
    rules = hooks.rules_table()
    assert all(f"| `{r.id}` |" in rules for r in BUILTIN_RULES)


def test_markers_expand_and_unknown_markers_fail() -> None:
    hooks = _hooks()
    out = hooks.on_page_markdown("a\n<!-- qcowlib:formats -->\nb")
    assert "| `qcow2` |" in out and "<!--" not in out
    try:
        hooks.on_page_markdown("<!-- qcowlib:nope -->")
    except ValueError as exc:
        assert "nope" in str(exc)
    else:
        raise AssertionError("an unknown marker must fail the build")


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")]
    assert [p for p in pages if p not in nav] == []
