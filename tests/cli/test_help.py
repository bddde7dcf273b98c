"""Help that teaches: every option explained, examples that run, --debug, suggestions.

The checks walk the parser, so options and commands added later are covered as well.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qcowlib.cli import COMMANDS, build_parser
from tests.conftest import cli, qemu_img, qemu_io, require_qemu

#: Commands whose examples need a service (a Glance): parsed, not run.
PARSE_ONLY = {"upload"}


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser under ``parser`` (nested command groups too), with its full name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{parser.prog} {name}"
                yield full, sub
                yield from _subparsers(sub)


def _examples(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """The ``(command line, description)`` pairs of a parser's epilog."""
    found: list[tuple[str, str]] = []
    lines = (parser.epilog or "").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  qcowlib "):
            what = lines[i + 1].strip() if i + 1 < len(lines) else ""
            found.append((line.strip(), what))
    return found


def _command_parser(name: str) -> argparse.ArgumentParser:
    parsers = dict(_subparsers(build_parser(name)))
    return parsers[f"qcowlib {name}"]


def test_every_option_of_every_command_has_help() -> None:
    parser = build_parser()
    missing = [
        f"{prog}: {'/'.join(a.option_strings) or a.dest}"
        for prog, p in [("qcowlib", parser), *_subparsers(parser)]
        for a in p._actions
        if not isinstance(a, argparse._SubParsersAction) and not (a.help and a.help.strip())
    ]
    assert missing == []


def test_every_command_has_help_a_description_and_examples() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helped = {c.dest for c in sub._choices_actions if c.help}
    for prog, p in _subparsers(parser):
        name = prog.split()[-1]
        assert name in helped, f"{prog} has no one-line help"
        assert p.description, f"{prog} has no description"
        examples = _examples(p)
        assert 1 <= len(examples) <= 2, f"{prog}: one or two examples in its epilog"
        for line, what in examples:
            assert line.startswith(prog + " "), line
            assert what, f"{line}: say what the example does"


def test_top_level_help_names_the_docs_and_every_command() -> None:
    out = cli("--help")
    assert out.returncode == 0
    assert "docs/" in out.stdout and "README.md" in out.stdout
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s+\S", out.stdout, re.M), name


@pytest.mark.parametrize("name", list(COMMANDS))
def test_examples_parse(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # upload's parser reads the cloud's configuration: give the examples' cloud one
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(
        "clouds:\n  mycloud:\n    auth_type: none\n"
        "    image_endpoint_override: http://127.0.0.1:9/\n"
    )
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
    parser = build_parser(name)
    for line, _ in _examples(_command_parser(name)):
        argv = shlex.split(line.split(" > ")[0].split(" | ")[0])[1:]
        args = parser.parse_args(argv)
        assert args.command == name


@pytest.fixture
def example_dir(tmp_path: Path) -> Path:
    """The images the examples name, and a ``qcowlib`` on PATH running this tree."""
    require_qemu()
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "1M")
    qemu_io(tmp_path / "base.qcow2", "qcow2", "write -P 0xb5 0 256k")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        tmp_path / "overlay.qcow2",
    )  # fmt: skip
    qemu_io(tmp_path / "overlay.qcow2", "qcow2", "write -P 0x0e 128k 64k")
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "disk.qcow2", "1M")
    qemu_io(tmp_path / "disk.qcow2", "qcow2", "write -P 0x11 64k 64k")
    qemu_img("convert", "-O", "raw", tmp_path / "disk.qcow2", tmp_path / "disk.raw")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "qcowlib"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m qcowlib "$@"\n')
    wrapper.chmod(0o755)
    return tmp_path


@pytest.mark.parametrize("name", [n for n in COMMANDS if n not in PARSE_ONLY])
def test_examples_run(name: str, example_dir: Path) -> None:
    """Each example, as a user would paste it into a shell, in a directory holding the
    images it names: it exits 0 (or the status its text announces) without a usage error."""
    env = dict(os.environ, PATH=f"{example_dir / 'bin'}:{os.environ['PATH']}")
    env["HOME"] = str(example_dir)
    src = Path(__file__).resolve().parents[2] / "src"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    examples = _examples(_command_parser(name))
    assert examples
    for line, what in examples:
        expected = re.search(r"\(exit (\d+)\)", what)
        res = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {line}"],
            cwd=example_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        status = int(expected.group(1)) if expected else 0
        assert res.returncode == status, f"{line}: {res.stderr}"
        assert "Traceback" not in res.stderr and "usage:" not in res.stderr, line


def test_debug_before_or_after_the_command_shows_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.qcow2"
    plain = cli("info", missing)
    assert plain.returncode == 1
    assert "Traceback" not in plain.stderr
    assert plain.stderr.count("\n") == 1 and plain.stderr.startswith("qcowlib: error:")
    argvs: list[list[str | Path]] = [["--debug", "info", missing], ["info", missing, "--debug"]]
    for argv in argvs:
        out = cli(*argv)
        assert out.returncode == 1, argv
        assert "Traceback (most recent call last)" in out.stderr, argv
        assert out.stderr.splitlines()[-1] == plain.stderr.strip(), argv


def test_debug_logs_detail(tmp_path: Path) -> None:
    require_qemu()
    image = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    quiet = cli("convert", "-O", "raw", image, tmp_path / "a.raw")
    loud = cli("convert", "-O", "raw", image, tmp_path / "b.raw", "--debug")
    assert quiet.returncode == loud.returncode == 0
    assert "DEBUG" not in quiet.stderr
    assert "qcowlib: DEBUG:" in loud.stderr


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["inf", "x"], "did you mean 'info'?"),
        (["flaten", "a", "b"], "did you mean 'flatten'?"),
        (["checksun", "x"], "did you mean 'checksum'"),
        (["convert", "-O", "qcwo2", "a", "b"], "did you mean 'qcow2'?"),
        (["info", "--outptu", "json", "x"], "did you mean '--output'?"),
        (["info", "x", "--backing-chian"], "did you mean '--backing-chain'?"),
        (["checksum", "--algos", "md5", "x"], "did you mean '--algo'?"),
    ],
)
def test_mistyped_commands_and_options_get_a_suggestion(argv: list[str], suggestion: str) -> None:
    out = cli(*argv)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert suggestion in out.stderr.splitlines()[-1]
    assert out.stderr.splitlines()[-1].startswith("qcowlib: error:")


def test_no_suggestion_for_nonsense() -> None:
    out = cli("zzzzzz", "x")
    assert out.returncode == 2
    assert "did you mean" not in out.stderr
    assert "invalid choice: 'zzzzzz'" in out.stderr
