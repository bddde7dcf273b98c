"""``qcowlib completion bash|zsh``: the scripts load, and bash's completes from the parser."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qcowlib.cli import COMMANDS, INPUT_FORMATS, build_parser


@pytest.fixture
def shell_env(tmp_path: Path) -> dict[str, str]:
    """An environment with a ``qcowlib`` on PATH that runs this tree."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "qcowlib"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m qcowlib "$@"\n')
    wrapper.chmod(0o755)
    src = Path(__file__).resolve().parents[2] / "src"
    return dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
        HOME=str(tmp_path),
    )


def _bash_complete(env: dict[str, str], *words: str) -> list[str]:
    """What bash offers for the last of ``words`` after ``source <(qcowlib completion bash)``."""
    script = (
        "source <(qcowlib completion bash) && "
        f"COMP_WORDS=(qcowlib {' '.join(shlex.quote(w) for w in words)}) && "
        f"COMP_CWORD={len(words)} && _qcowlib && printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    out = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stderr == ""
    return out.stdout.split()


def test_bash_script_loads(shell_env: dict[str, str]) -> None:
    out = subprocess.run(
        ["bash", "-c", "source <(qcowlib completion bash); complete -p qcowlib"],
        env=shell_env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "-F _qcowlib qcowlib" in out.stdout
    assert out.stderr == ""


def test_bash_completes_commands_options_and_choices(shell_env: dict[str, str]) -> None:
    assert _bash_complete(shell_env, "") == list(COMMANDS)
    assert _bash_complete(shell_env, "ch") == [c for c in COMMANDS if c.startswith("ch")]
    assert _bash_complete(shell_env, "--de") == ["--debug"]
    assert "--backing-chain" in _bash_complete(shell_env, "info", "--")
    assert _bash_complete(shell_env, "convert", "-O", "") == list(INPUT_FORMATS)
    assert _bash_complete(shell_env, "--debug", "info", "--output", "j") == ["json"]
    assert _bash_complete(shell_env, "info", "") == []  # file names: bash's default


def test_bash_offers_every_option_of_every_command(shell_env: dict[str, str]) -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        offered = set(_bash_complete(shell_env, name, "-"))
        wanted = {o for a in parser._actions for o in a.option_strings}
        assert offered == wanted, name


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_script_loads_and_registers(shell_env: dict[str, str], tmp_path: Path) -> None:
    script = tmp_path / "_qcowlib"
    out = subprocess.run(
        [sys.executable, "-m", "qcowlib", "completion", "zsh"],
        env=shell_env,
        capture_output=True,
        text=True,
        check=True,
    )
    script.write_text(out.stdout)
    for name in COMMANDS:
        assert f"'{name}:" in out.stdout
    subprocess.run(["zsh", "-n", str(script)], check=True)
    res = subprocess.run(
        [
            "zsh",
            "-f",
            "-c",
            f"autoload -U compinit; compinit -u -d {tmp_path}/zcompdump; source {script}; "
            "print -- $_comps[qcowlib]; whence -w _qcowlib",
        ],
        env=shell_env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert res.stdout.split() == ["_qcowlib", "_qcowlib:", "function"]
    assert res.stderr == ""


_ZSH_STUBS = """
_arguments() {
    if [[ $1 == -C ]]; then state=$STUB_STATE; return 0; fi
    print -l -- "$@"
}
_describe() { print -l -- "${(@P)4}" }
compdef() { :; }
source "$1"
words=(${=STUB_WORDS})
_qcowlib
"""


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_script_hands_zsh_every_command_and_option(tmp_path: Path) -> None:
    """_qcowlib run with stand-ins for _describe and _arguments: the command list, then
    per command a spec for each option (with its choices) and files for the rest."""
    script = tmp_path / "_qcowlib"
    out = subprocess.run(
        [sys.executable, "-m", "qcowlib", "completion", "zsh"],
        capture_output=True,
        text=True,
        check=True,
    )
    script.write_text(out.stdout)
    stubs = tmp_path / "stubs.zsh"
    stubs.write_text(_ZSH_STUBS)

    def run(state: str, words: str = "") -> list[str]:
        env = dict(os.environ, STUB_STATE=state, STUB_WORDS=words)
        res = subprocess.run(
            ["zsh", "-f", str(stubs), str(script)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert res.stderr == ""
        return res.stdout.splitlines()

    assert [line.split(":")[0] for line in run("command")] == list(COMMANDS)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        specs = run("args", name)
        offered = {spec.lstrip("*").split("[")[0] for spec in specs if spec.startswith(("-", "*-"))}
        assert offered == {o for a in parser._actions for o in a.option_strings}, name
        assert specs[-1] == "*:file:_files"
    convert = run("args", "convert")
    formats = " ".join(INPUT_FORMATS)
    assert any(s.startswith("-O[") and s.endswith(f":FMT:({formats})") for s in convert)


def test_unknown_shell_is_a_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qcowlib", "completion", "fish"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2
    assert "invalid choice: 'fish'" in out.stderr
