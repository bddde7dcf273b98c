"""``qcowlib validate`` on the command line: the contract's JSON, exit statuses, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import qcowlib
from qcowlib.errors import QcowlibError

pytestmark = pytest.mark.usefixtures("qemu")


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcowlib", "validate", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def check_contract(out: dict[str, object]) -> None:
    assert set(out) == {"ok", "format", "findings"}
    assert isinstance(out["ok"], bool) and isinstance(out["format"], str)
    assert isinstance(out["findings"], list)
    for f in out["findings"]:
        assert (
            {"rule", "severity", "message"} <= set(f) <= {"rule", "severity", "message", "offset"}
        )
        assert f["severity"] in ("error", "warning")
        assert isinstance(f["message"], str) and f["message"]
        if "offset" in f:
            assert isinstance(f["offset"], int)


def test_accepted_and_rejected_json(images: dict[str, Path]) -> None:
    ok = run("--output", "json", images["qcow2-v3"])
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    check_contract(out)
    assert out == {"ok": True, "format": "qcow2", "findings": []}

    bad = run("--output=json", "--disk-format", "qcow2", images["qcow2-backing"])
    assert bad.returncode == 1 and bad.stderr == ""
    out = json.loads(bad.stdout)
    check_contract(out)
    assert out["ok"] is False and out["format"] == "qcow2"
    assert [f["rule"] for f in out["findings"]] == ["backing-file"]
    assert out["findings"][0]["offset"] == 8
    assert "qcowlib flatten" in out["findings"][0]["message"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("vhd-bad-footer-checksum", "VHD footer checksum is wrong"),
        ("vhdx-unreplayed-log", "never replayed"),
        ("vmdk-gd-past-eof", "grain directory (2048 entries"),
    ],
)
def test_never_laxer_than_opening(images: dict[str, Path], name: str, reason: str) -> None:
    """Images made by qemu-img and poked where qcowlib's reader refuses them: validate
    refuses them too, under every policy, and says why."""
    with pytest.raises(QcowlibError):
        qcowlib.open(str(images[name])).close()
    for policy in ("glance", "permissive"):
        res = run("--output", "json", "--policy", policy, images[name])
        assert res.returncode == 1, res.stdout + res.stderr
        out = json.loads(res.stdout)
        check_contract(out)
        assert out["ok"] is False
        (finding,) = [f for f in out["findings"] if f["rule"] == "structure"]
        assert finding["severity"] == "error" and reason in finding["message"], finding


def test_format_is_the_detected_one(images: dict[str, Path]) -> None:
    for name, fmt in (("vmdk-streamOptimized", "vmdk"), ("vhd-fixed", "vpc"), ("iso", "iso")):
        res = run("--output", "json", "-f", "raw", images[name])
        out = json.loads(res.stdout)
        check_contract(out)
        assert out["format"] == fmt


def test_disk_format_and_policies(images: dict[str, Path]) -> None:
    assert run("--disk-format", "qcow2", images["raw-mbr"]).returncode == 1
    # A container declared raw: Glance would store it and no VM would boot from it.
    res = run("--disk-format", "raw", images["qcow2-v3"])
    assert res.returncode == 1 and "no VM would boot from it" in res.stdout
    assert run(images["raw-mbr"]).returncode == 0  # default: declared as detected
    assert run("--policy", "strict", images["qcow2-dirty"]).returncode == 1
    assert run("--policy", "glance", images["qcow2-dirty"]).returncode == 0
    assert run("--policy", "permissive", images["qcow2-backing"]).returncode == 0
    res = run("--policy", "strict", "--output", "json", images["qcow2-dirty"])
    findings = json.loads(res.stdout)["findings"]
    assert [(f["rule"], f["severity"]) for f in findings] == [("dirty", "error")]


def test_human_output(images: dict[str, Path]) -> None:
    res = run(images["vmdk-monolithicFlat"])
    assert res.returncode == 1
    assert res.stdout.startswith(f"{images['vmdk-monolithicFlat']}: rejected by policy glance")
    assert "error   vmdk-create-type:" in res.stdout
    assert "'monolithicFlat-flat.vmdk' (FLAT)" in res.stdout


def test_unreadable_files_are_errors(tmp_path: Path) -> None:
    for target in (tmp_path / "missing.qcow2", tmp_path):
        res = run("--output", "json", target)
        assert res.returncode == 1
        assert res.stdout == ""
        assert res.stderr.startswith("qcowlib: error: ")
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    res = run("--policy", "nosuch", tmp_path / "missing")
    assert res.returncode == 1 and "qcowlib: error:" in res.stderr


def test_usage_errors_exit_2(images: dict[str, Path]) -> None:
    assert run().returncode == 2
    assert run("-f", "bogus", images["qcow2-v3"]).returncode == 2
    assert run("--output", "yaml", images["qcow2-v3"]).returncode == 2


@pytest.mark.parametrize(
    "content",
    [b"", b"\0" * 1024, b"QFI\xfb" + b"\xff" * 200, b"KDMV" + b"\xff" * 600, b"conectix" * 70],
)
def test_garbage_never_tracebacks(content: bytes, tmp_path: Path) -> None:
    f = tmp_path / "junk.img"
    f.write_bytes(content)
    for policy in ("glance", "strict", "permissive"):
        res = run("--policy", policy, "--output", "json", f)
        assert res.returncode in (0, 1)
        assert "Traceback" not in res.stderr and res.stderr == ""
        check_contract(json.loads(res.stdout))
