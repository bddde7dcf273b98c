"""Differential tests: every generated fixture read by qcowlib vs qemu-img itself.

For each fixture: ``convert -O raw`` is byte-identical to qemu-img's, ``info`` JSON equals
qemu-img's (with and without ``--backing-chain``), ``map`` JSON is the same text, and
random reads agree with the raw conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcowlib
from qcowlib.cli import main as cli_main
from tests.conftest import have_qemu, qemu_img, qemu_json

if have_qemu():
    from tests.fixtures.generate import ensure_fixtures

    FIXTURES = ensure_fixtures()
    NAMES = sorted(FIXTURES)
else:  # pragma: no cover - conftest's require_qemu decides skip or fail
    FIXTURES = {}
    NAMES = ["<qemu-img missing>"]


@pytest.fixture(scope="module")
def qemu_raw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """qemu-img's raw conversion of each fixture, made once."""
    out = tmp_path_factory.mktemp("qemu-raw")
    made: dict[str, Path] = {}
    for name, fx in FIXTURES.items():
        dst = out / f"{name}.raw"
        qemu_img("convert", "-f", fx.fmt, "-O", "raw", fx.path, dst)
        made[name] = dst
    return made


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fixture(name: str) -> Any:
    if name not in FIXTURES:
        from tests.conftest import require_qemu

        require_qemu()
    return FIXTURES[name]


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli_main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("name", NAMES)
def test_convert_raw_identical(name: str, qemu_raw: dict[str, Path], tmp_path: Path) -> None:
    fx = _fixture(name)
    dst = tmp_path / "out.raw"
    qcowlib.convert(str(fx.path), str(dst), "raw")
    assert dst.stat().st_size == qemu_raw[name].stat().st_size
    assert _digest(dst) == _digest(qemu_raw[name])
    # sparse: our output allocates no more than qemu-img's does (+ one block of slack)
    assert dst.stat().st_blocks <= qemu_raw[name].stat().st_blocks + 8


@pytest.mark.parametrize("name", NAMES)
def test_info_json_equal(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    fx = _fixture(name)
    cwd = os.getcwd()
    os.chdir(fx.path.parent)  # relative names, as a user would type them
    try:
        rel = fx.path.name
        status, out, err = _cli(capsys, "info", "--output", "json", rel)
        assert status == 0, err
        assert json.loads(out) == qemu_json("info", rel)
        status, out, err = _cli(capsys, "info", "--output=json", "--backing-chain", rel)
        assert status == 0, err
        assert json.loads(out) == qemu_json("info", "--backing-chain", rel)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("name", NAMES)
def test_map_json_identical(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    fx = _fixture(name)
    status, out, err = _cli(capsys, "map", "--output", "json", str(fx.path))
    assert status == 0, err
    expected = qemu_img("map", "--output=json", fx.path).stdout
    assert out == expected


@pytest.mark.parametrize("name", NAMES)
def test_map_human_identical(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    fx = _fixture(name)
    status, out, _ = _cli(capsys, "map", str(fx.path))
    ref = qemu_img("map", fx.path, check=False)
    assert (status == 0) == (ref.returncode == 0)
    assert out == ref.stdout


@pytest.mark.parametrize("name", NAMES)
def test_compare_with_qemu_raw(
    name: str, qemu_raw: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    fx = _fixture(name)
    status, out, err = _cli(capsys, "compare", str(fx.path), str(qemu_raw[name]))
    assert (status, out) == (0, "Images are identical.\n"), err


@pytest.mark.parametrize("name", NAMES)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_random_reads_match_raw(name: str, qemu_raw: dict[str, Path], data: st.DataObject) -> None:
    fx = _fixture(name)
    raw = qemu_raw[name]
    size = raw.stat().st_size
    offset = data.draw(st.integers(0, max(0, size - 1)))
    length = data.draw(st.integers(0, min(size - offset, 3 << 20)))
    with qcowlib.open(str(fx.path)) as disk, raw.open("rb") as f:
        assert disk.virtual_size == size
        f.seek(offset)
        assert disk.read(offset, length) == f.read(length)


@pytest.mark.parametrize("name", NAMES)
def test_info_human_identical(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    fx = _fixture(name)
    cwd = os.getcwd()
    os.chdir(fx.path.parent)
    try:
        for extra in ([], ["--backing-chain"]):
            status, out, err = _cli(capsys, "info", *extra, fx.path.name)
            assert status == 0, err
            assert out == qemu_img("info", *extra, fx.path.name).stdout
    finally:
        os.chdir(cwd)
