"""Shared test fixtures: qemu-img availability and the generated image fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.glance_server import glance_server

if TYPE_CHECKING:
    from tests.fixtures.generate import Fixture

__all__ = ["fixtures", "glance_server", "qemu"]

IN_CI = os.environ.get("CI") == "true"


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
