"""Sanity checks for the qemu-generated disk-image fixtures (tests/fixtures/generate.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.generate import Fixture, ensure_fixtures


@pytest.fixture(scope="session")
def fixtures() -> dict[str, Fixture]:
    """All generated fixtures by name (built into the cache on first use)."""
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.skip("qemu-img/qemu-io not installed; cannot generate disk-image fixtures")
    return ensure_fixtures()


def _qemu_img_json(fixture_path: Path, *args: str) -> Any:
    """Run a read-only ``qemu-img`` subcommand with JSON output next to the image.

    Runs in the image's directory, so nothing depends on the caller's working directory.
    """
    proc = subprocess.run(
        ["qemu-img", *args, "--output", "json", fixture_path.name],
        cwd=fixture_path.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    # `qemu-img check` exits 2/3 for corruptions/leaks but still prints JSON.
    assert proc.stdout, f"qemu-img {' '.join(args)} {fixture_path}: {proc.stderr}"
    return json.loads(proc.stdout)


def _info(fixture: Fixture) -> dict[str, Any]:
    info: dict[str, Any] = _qemu_img_json(fixture.path, "info", "-f", fixture.fmt)
    return info


def _format_data(fixture: Fixture) -> dict[str, Any]:
    data: dict[str, Any] = _info(fixture).get("format-specific", {}).get("data", {})
    return data


def _with(fixtures: dict[str, Fixture], tag: str) -> list[Fixture]:
    selected = [f for f in fixtures.values() if tag in f.tags]
    assert selected, f"no fixture is tagged {tag!r}"
    return selected


def test_fixture_paths_exist(fixtures: dict[str, Fixture]) -> None:
    assert len(fixtures) >= 30
    for name, fixture in fixtures.items():
        assert fixture.name == name
        assert fixture.path.is_absolute()
        assert fixture.path.is_file(), fixture
        assert fixture.fmt in {"qcow2", "raw"}
        assert fixture.description


def test_info_reports_format(fixtures: dict[str, Fixture]) -> None:
    for fixture in fixtures.values():
        assert _info(fixture)["format"] == fixture.fmt, fixture.name


def test_qcow2_fixtures_check_clean(fixtures: dict[str, Fixture]) -> None:
    for fixture in fixtures.values():
        if fixture.fmt != "qcow2":
            continue
        result = _qemu_img_json(fixture.path, "check", "-f", "qcow2")
        problems = result.get("corruptions", 0) + result.get("leaks", 0)
        if "dirty" in fixture.tags:
            assert problems > 0, fixture.name  # stale refcounts are the point
        else:
            assert problems == 0 and result.get("check-errors", 0) == 0, (fixture.name, result)


def test_cached_call_is_stable(fixtures: dict[str, Fixture]) -> None:
    assert ensure_fixtures() == fixtures


def test_tag_extended_l2(fixtures: dict[str, Fixture]) -> None:
    for fixture in _with(fixtures, "extended_l2"):
        assert _format_data(fixture)["extended-l2"] is True, fixture.name


def test_tag_versions(fixtures: dict[str, Fixture]) -> None:
    for fixture in _with(fixtures, "v2"):
        assert _format_data(fixture)["compat"] == "0.10", fixture.name
    for fixture in _with(fixtures, "v3"):
        assert _format_data(fixture)["compat"] == "1.1", fixture.name


def test_tag_chain(fixtures: dict[str, Fixture]) -> None:
    for fixture in _with(fixtures, "chain"):
        info = _info(fixture)
        assert info.get("backing-filename"), fixture.name
        assert info.get("backing-filename-format") in {"qcow2", "raw"}, fixture.name
    for fixture in fixtures.values():
        if "chain" not in fixture.tags:
            assert "backing-filename" not in _info(fixture), fixture.name


def test_tag_relative_backing(fixtures: dict[str, Fixture]) -> None:
    for fixture in _with(fixtures, "relative_backing"):
        backing = _info(fixture)["backing-filename"]
        assert not Path(backing).is_absolute() and "/" in backing, (fixture.name, backing)


def test_tag_overlay_sizes(fixtures: dict[str, Fixture]) -> None:
    for tag in ("overlay_larger", "overlay_smaller"):
        for fixture in _with(fixtures, tag):
            chain = _qemu_img_json(fixture.path, "info", "--backing-chain")
            top, backing = chain[0]["virtual-size"], chain[1]["virtual-size"]
            assert (top > backing) if tag == "overlay_larger" else (top < backing), fixture.name


def test_tag_dirty(fixtures: dict[str, Fixture]) -> None:
    for fixture in _with(fixtures, "dirty"):
        assert _info(fixture)["dirty-flag"] is True, fixture.name
    for fixture in fixtures.values():
        if "dirty" not in fixture.tags:
            assert not _info(fixture).get("dirty-flag", False), fixture.name


def test_tag_lazy_refcounts(fixtures: dict[str, Fixture]) -> None:
    for fixture in _with(fixtures, "lazy_refcounts"):
        assert _format_data(fixture)["lazy-refcounts"] is True, fixture.name


def test_tag_snapshot(fixtures: dict[str, Fixture]) -> None:
    for fixture in _with(fixtures, "snapshot"):
        assert len(_info(fixture).get("snapshots", [])) >= 2, fixture.name


def test_tag_bitmap(fixtures: dict[str, Fixture]) -> None:
    for fixture in _with(fixtures, "bitmap"):
        assert _format_data(fixture).get("bitmaps"), fixture.name


def test_tag_compression(fixtures: dict[str, Fixture]) -> None:
    for fixture in _with(fixtures, "compressed"):
        data = _format_data(fixture)
        expected = "zstd" if "zstd" in fixture.tags else "zlib"
        assert data["compression-type"] == expected, fixture.name
        check = _qemu_img_json(fixture.path, "check", "-f", "qcow2")
        assert check.get("compressed-clusters", 0) > 0, fixture.name


def test_tag_external_data(fixtures: dict[str, Fixture]) -> None:
    for fixture in _with(fixtures, "external_data"):
        data = _format_data(fixture)
        data_file = Path(data["data-file"])
        assert data_file.is_absolute() and data_file.is_file(), (fixture.name, data_file)
        assert data.get("data-file-raw", False) is ("data_file_raw" in fixture.tags), fixture.name


def test_tag_geometry(fixtures: dict[str, Fixture]) -> None:
    sizes = {"512": 512, "1k": 1024, "4k": 4096, "16k": 16384, "64k": 65536, "2m": 2 << 20}
    for fixture in fixtures.values():
        if fixture.fmt != "qcow2":
            continue
        info = _info(fixture)
        cluster_tags = [t for t in fixture.tags if t.startswith("cluster_")]
        assert len(cluster_tags) == 1, fixture.name
        assert info["cluster-size"] == sizes[cluster_tags[0].removeprefix("cluster_")], fixture.name
        refcount_tags = [t for t in fixture.tags if t.startswith("refcount_")]
        assert len(refcount_tags) == 1, fixture.name
        bits = int(refcount_tags[0].removeprefix("refcount_"))
        assert info["format-specific"]["data"]["refcount-bits"] == bits, fixture.name
        unaligned = info["virtual-size"] % info["cluster-size"] != 0
        assert unaligned == ("unaligned_size" in fixture.tags), fixture.name


def test_tag_raw(fixtures: dict[str, Fixture]) -> None:
    for fixture in _with(fixtures, "raw"):
        assert fixture.fmt == "raw"
    for fixture in _with(fixtures, "sparse"):
        stat = fixture.path.stat()
        assert stat.st_blocks * 512 < stat.st_size, fixture.name  # has holes
