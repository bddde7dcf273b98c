"""What ``--help`` shows besides the options: the help layout, examples, suggestions."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["DOCS", "HelpFormatter", "did_you_mean", "examples"]

#: Where the documentation is (named by ``qcowlib --help``).
DOCS = (
    "README.md and docs/ in the qcowlib source tree (docs/cli.md: every command; "
    "tools/docs builds them into a site)"
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs: indented lines (examples) stay as written, the other
    lines are wrapped as paragraphs."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        out: list[str] = []
        paragraph: list[str] = []

        def flush() -> None:
            if paragraph:
                out.append(
                    textwrap.fill(
                        " ".join(paragraph), width, initial_indent=indent, subsequent_indent=indent
                    )
                )
                paragraph.clear()

        for line in text.splitlines():
            if not line.strip() or line[0].isspace() or line.endswith(":"):
                flush()
                out.append(indent + line if line.strip() else "")
            else:
                paragraph.append(line.strip())
        flush()
        return "\n".join(out)


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """``'a' or 'b'``: the candidates closest to a mistyped ``word`` (empty if none is
    close); those clearly further than the best one are left out."""
    import difflib

    scored = []
    for candidate in candidates:
        matcher = difflib.SequenceMatcher(None, word, candidate)
        if matcher.real_quick_ratio() >= 0.6 and matcher.quick_ratio() >= 0.6:
            scored.append((matcher.ratio(), candidate))
    scored = sorted((s for s in scored if s[0] >= 0.6), reverse=True)
    if not scored:
        return ""
    best = scored[0][0]
    close = [c for ratio, c in scored[:3] if ratio >= best - 0.1]
    return " or ".join(repr(c) for c in close)


def examples(*items: tuple[str, str]) -> str:
    """A command's epilog: ``(command line, what it does)`` pairs, as ``--help`` shows them.

    Every command line is run by the tests against small images (tests/cli/test_help.py):
    name files ``disk.qcow2``, ``disk.raw``, ``base.qcow2`` and ``overlay.qcow2`` (over
    base.qcow2), and say ``(exit N)`` in the text of one that exits N on them.
    """
    lines = ["examples:"]
    for command, what in items:
        lines += [f"  {command}", f"      {what}"]
    return "\n".join(lines)
