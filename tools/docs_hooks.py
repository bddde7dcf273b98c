"""MkDocs hooks: pages that are generated from the code, so they cannot go stale.

A page holds a marker (``<!-- qcowlib:NAME -->``) and the hook replaces it with Markdown
made from what the program itself knows:

* ``cli-reference``: every command, its usage, options and examples, from the argparse
  parser the CLI runs (``qcowlib.cli.build_parser``);
* ``formats``: the format registry (``qcowlib.formats()``) as a table;
* ``rules``: the built-in validation rules, their ids, scopes and descriptions.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

_MARKER = re.compile(r"<!-- qcowlib:([a-z-]+) -->")


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace each generator marker with its Markdown."""

    def expand(match: re.Match[str]) -> str:
        generator = GENERATORS.get(match.group(1))
        if generator is None:
            raise ValueError(f"unknown docs generator {match.group(1)!r}")
        return generator()

    return _MARKER.sub(expand, markdown)


# -- CLI reference ------------------------------------------------------------------------


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _option_row(action: argparse.Action) -> str | None:
    if action.help == argparse.SUPPRESS:
        return None
    if action.option_strings:
        name = ", ".join(f"`{o}`" for o in action.option_strings)
        if action.nargs != 0:
            metavar = action.metavar or action.dest.upper()
            if action.choices is not None:
                metavar = "{" + ",".join(map(str, action.choices)) + "}"
            name += f" `{metavar}`"
    else:
        name = f"`{action.metavar or action.dest}`"
    text = _cell(action.help or "")
    default = action.default
    if (
        action.option_strings
        and action.nargs != 0
        and default not in (None, argparse.SUPPRESS)
        and "default" not in text.lower()
    ):
        text += f" (default: `{default}`)"
    return f"| {name} | {text} |"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_reference() -> str:
    """Every command as the parser defines it."""
    from qcowlib.cli import build_parser

    parser = build_parser()
    out = ["```text", parser.format_usage().strip(), "```", ""]
    for name, sub in _subcommands(parser).items():
        out += [f"## {name}", ""]
        if sub.description:
            out += [sub.description.strip(), ""]
        usage = sub.format_usage().replace("usage: ", "", 1).strip()
        out += ["```text", usage, "```", ""]
        rows = [r for a in sub._actions if (r := _option_row(a)) is not None]
        if rows:
            out += ["| argument | meaning |", "|---|---|", *rows, ""]
        if sub.epilog:
            out += ["```text", sub.epilog.strip("\n"), "```", ""]
    return "\n".join(out)


# -- formats and rules --------------------------------------------------------------------


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def formats_table() -> str:
    """The registry as a table."""
    import qcowlib

    rows = [
        "| format | what | read | write | stream | create | check |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in qcowlib.formats():
        rows.append(
            f"| `{f.name}` | {_cell(f.title)} | {_yes(f.read)} | {_yes(f.write)} | "
            f"{_yes(f.stream)} | {_yes(f.create)} | {_yes(f.check)} |"
        )
    return "\n".join(rows) + "\n"


def rules_table() -> str:
    """The built-in validation rules, in the order they run."""
    from qcowlib.validate.rules import BUILTIN_RULES

    rows = ["| rule | formats | what it refuses or warns about |", "|---|---|---|"]
    for rule in BUILTIN_RULES:
        scope = ", ".join(f"`{f}`" for f in sorted(rule.formats)) if rule.formats else "all"
        rows.append(f"| `{rule.id}` | {scope} | {_cell(rule.description)} |")
    return "\n".join(rows) + "\n"


GENERATORS: dict[str, Callable[[], str]] = {
    "cli-reference": cli_reference,
    "formats": formats_table,
    "rules": rules_table,
}
