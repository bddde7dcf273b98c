"""Shared test fixtures: qemu-img availability and the generated image fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.glance_server import glance_context_server, glance_server

if TYPE_CHECKING:
    from tests.fixtures.generate import Fixture

__all__ = ["fixtures", "glance_context_server", "glance_server", "qemu"]

IN_CI = os.environ.get("CI") == "true"


@pytest.fixture(scope="session", autouse=True)
def _sighup_as_a_terminal_sends_it() -> Iterator[None]:
    """Children see SIGHUP with its default action even when the test run was started
    under ``nohup`` (they would inherit its SIG_IGN, which qcowlib rightly keeps, and the
    signal tests would see no exit status 129)."""
    import signal

    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, previous)


def have_qemu() -> bool:
    return shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None


def require_qemu() -> None:
    """Skip locally without qemu-img; under CI=true a missing qemu-img is a failure."""
    if not have_qemu():
        if IN_CI:
            pytest.fail("qemu-img/qemu-io are required under CI=true")
        pytest.skip("qemu-img/qemu-io not installed")


def qemu_img(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run qemu-img and return the completed process (text mode)."""
    return subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, check=check
    )


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m qcowlib ARGS`` and return the completed process (text mode)."""
    return subprocess.run(
        [sys.executable, "-m", "qcowlib", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def qemu_io(path: str | Path, fmt: str, *cmds: str) -> None:
    """Run qemu-io commands (``write -P 1 0 64k`` ...) on an image of format ``fmt``."""
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def seeded_raw(path: Path, size: int, seed: int, runs: int = 6) -> Path:
    """A sparse raw file of ``size`` bytes with ``runs`` random runs of random bytes."""
    import random

    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for _ in range(runs):
            n = rng.randrange(1, 300_000)
            off = rng.randrange(0, max(1, size - n))
            f.seek(off)
            f.write(rng.randbytes(min(n, size - off)))
    return path


def qemu_json(*args: str | Path) -> Any:
    import json

    return json.loads(qemu_img(*args, "--output=json").stdout)


@pytest.fixture(scope="session")
def fixtures() -> dict[str, Fixture]:
    require_qemu()
    from tests.fixtures.generate import ensure_fixtures

    return ensure_fixtures()


@pytest.fixture(scope="session")
def qemu() -> None:
    require_qemu()
