"""Built-in rules and policies on images made by qemu-img (and crafted bytes)."""

from __future__ import annotations

import builtins
import importlib
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qcowlib.errors import InvalidArgument, QcowlibIOError
from qcowlib.validate import (
    POLICIES,
    Finding,
    Policy,
    ValidationReport,
    get_policy,
    register_policy,
    validate,
)
from tests.validate.images import CASES, Case, create, poke, qemu_io

pytestmark = pytest.mark.usefixtures("qemu")


def rules_of(report: ValidationReport, severity: str) -> set[str]:
    return {f.rule for f in report.findings if f.severity == severity}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_verdicts(case: Case, images: dict[str, Path]) -> None:
    report = validate(images[case.name], disk_format=case.disk_format)
    text = report.human()
    assert report.ok is case.accepted, text
    assert set(case.errors) <= rules_of(report, "error"), text
    assert set(case.warnings) <= rules_of(report, "warning"), text
    if case.accepted:
        assert not report.errors, text
    if case.format is not None:
        assert report.format == case.format
    if case.says:
        first = next(f for f in report.errors if f.rule == case.errors[0])
        for word in case.says:
            assert word in first.message, first.message
    for f in report.findings:
        assert f.message and "\n" not in f.message
        assert f.severity in ("error", "warning")


def test_backing_file_message_names_file_and_flatten(images: dict[str, Path]) -> None:
    path = images["qcow2-backing"]
    report = validate(path)
    (finding,) = report.errors
    assert finding.rule == "backing-file"
    assert "'base.qcow2'" in finding.message
    assert f"qcowlib flatten {path}" in finding.message
    assert finding.offset == 8
    assert finding.to_json() == {
        "rule": "backing-file",
        "severity": "error",
        "message": finding.message,
        "offset": 8,
    }


def test_validate_opens_only_the_image(
    images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backing files, data files and VMDK extents are reported, never opened."""
    opened: list[str] = []
    real_os_open = os.open
    real_open = builtins.open

    def spy_os_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.fspath(path))
        return real_os_open(path, *args, **kwargs)

    def spy_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    for name in (
        "qcow2-backing",
        "qcow2-data-file",
        "vmdk-monolithicFlat",
        "vmdk-twoGbMaxExtentSparse",
        "vmdk-passwd-flat",
        "vmdk-descriptor-other-file",
        "vmdk-capacity0",
        "vmdk-child",
        "qcow2-data",
    ):
        opened.clear()
        path = str(images[name])
        validate(path)
        strays = [p for p in opened if p != path and not p.startswith("/proc/self/fd/")]
        assert not strays, (name, strays)
        assert path in opened


def test_check_rule_runs_and_reports(images: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("qcowlib.ops.check")
    img = create(tmp_path / "leaky.qcow2", "qcow2", "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 64k", img)
    data = img.read_bytes()
    reftable = struct.unpack_from(">Q", data, 48)[0]
    block = struct.unpack_from(">Q", data, reftable)[0]
    poke(img, block, struct.pack(">H", 2))  # header cluster: refcount 2, one reference
    report = validate(img)
    assert report.ok, report.human()
    assert "check" in rules_of(report, "warning")
    assert "leaked" in next(f.message for f in report.findings if f.rule == "check")

    poke(img, block, struct.pack(">H", 0))  # refcount 0 for a referenced cluster
    report = validate(img)
    assert not report.ok
    assert "check" in rules_of(report, "error")
    permissive = validate(img, policy="permissive")
    assert not permissive.ok  # a corruption is structural: refused by every policy


def test_check_rule_follows_the_policy(
    images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check rule runs :func:`qcowlib.ops.check.check`, unless the policy says not to."""
    import qcowlib.ops.check as ops_check

    calls: list[str] = []
    real = ops_check.check

    def spy(path: str, fmt: str | None = None, repair: str | None = None) -> Any:
        calls.append(path)
        return real(path, fmt, repair)

    monkeypatch.setattr(ops_check, "check", spy)
    assert validate(images["qcow2-data"]).ok and calls
    calls.clear()
    no_check = get_policy("glance").replace(run_check=False)
    report = validate(images["qcow2-data"], policy=no_check)
    assert report.ok and not report.findings and not calls


def test_policies(images: dict[str, Path]) -> None:
    dirty = images["qcow2-dirty"]
    assert validate(dirty).ok
    strict = validate(dirty, policy="strict")
    assert not strict.ok and rules_of(strict, "error") == {"dirty"}
    assert strict.policy == "strict"

    backing = images["qcow2-backing"]
    permissive = validate(backing, policy="permissive")
    assert permissive.ok and rules_of(permissive, "warning") == {"backing-file"}
    assert not validate(images["qcow2-truncated"], policy="permissive").ok
    assert not validate(images["qcow2-garbage-header"], policy="permissive").ok
    assert validate(images["vmdk-monolithicFlat"], policy="permissive").ok

    off = get_policy("glance").replace(name="site", severities={"backing-file": "off"})
    assert validate(backing, policy=off).ok
    assert not validate(backing, policy=off.replace(severities={"backing-file": "error"})).ok
    down = off.replace(severities={"backing-file": "warning"})
    assert rules_of(validate(backing, policy=down), "warning") == {"backing-file"}


def test_policy_settings(images: dict[str, Path]) -> None:
    glance = get_policy("glance")
    small = glance.replace(image_size_cap=64 * 1024)
    report = validate(images["raw-gpt"], policy=small, disk_format="raw")
    assert rules_of(report, "error") == {"image-size", "virtual-size"}
    report = validate(images["qcow2-huge"], policy=glance.replace(max_virtual_size=4 << 40))
    assert report.ok, report.human()
    tiny = glance.replace(max_virtual_size=512 * 1024)
    assert "virtual-size" in rules_of(validate(images["qcow2-v3"], policy=tiny), "error")

    flat_ok = glance.replace(vmdk_allowed_types=("monolithicFlat",))
    report = validate(images["vmdk-monolithicFlat"], disk_format="vmdk", policy=flat_ok)
    assert rules_of(report, "error") == {"vmdk-extent"}  # the type is allowed, the extent not
    report = validate(images["vmdk-monolithicSparse"], disk_format="vmdk", policy=flat_ok)
    assert rules_of(report, "error") == {"vmdk-create-type"}

    lenient = glance.replace(require_image_format_match=False)
    report = validate(images["garbage-as-qcow2"], policy=lenient)
    assert report.ok and rules_of(report, "warning") == {"format-match"}

    nonfatal = glance.replace(gpt_safety_checks_nonfatal=("mbr",))
    assert validate(images["raw-mbr-bad-boot"], disk_format="raw", policy=nonfatal).ok
    # Glance sees "gpt" content, which is no match for aki: refused before any MBR check.
    aki = validate(images["raw-mbr-bad-boot"], disk_format="aki")
    assert rules_of(aki, "error") == {"format-match"}
    assert "partition table" in aki.errors[0].message

    extl2 = glance.replace(qcow2_incompatible_mask=0b11111)
    assert validate(images["qcow2-extended-l2"], policy=extl2).ok


def test_policy_errors() -> None:
    with pytest.raises(InvalidArgument):
        get_policy("nope")
    with pytest.raises(InvalidArgument):
        Policy("x", severities={"dirty": "fatal"})
    with pytest.raises(InvalidArgument):
        Policy("x", mode="lenient")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        Policy("x", image_size_cap=0)
    with pytest.raises(InvalidArgument):
        register_policy(Policy("glance"))


def test_register_policy(images: dict[str, Path]) -> None:
    site = get_policy("strict").replace(name="site-test-strict")
    register_policy(site)
    try:
        assert not validate(images["qcow2-dirty"], policy="site-test-strict").ok
    finally:
        del POLICIES["site-test-strict"]


def test_disk_format_both_ways(images: dict[str, Path]) -> None:
    raw_as_qcow2 = validate(images["raw-mbr"], disk_format="qcow2")
    assert not raw_as_qcow2.ok
    (f,) = raw_as_qcow2.errors
    assert f.rule == "format-match" and "declare --disk-format raw" in f.message
    qcow2_as_raw = validate(images["qcow2-v3"], disk_format="raw")
    assert not qcow2_as_raw.ok  # a container declared raw: stored, and boots nothing
    assert rules_of(qcow2_as_raw, "error") == {"format-match"}
    assert validate(images["qcow2-v3"], disk_format="raw", policy="permissive").ok
    assert validate(images["raw-mbr"], disk_format=None).ok
    assert validate(images["garbage-as-raw"], disk_format="ami").ok
    weird = validate(images["qcow2-v3"], disk_format="luks")
    assert rules_of(weird, "error") == {"format-match"}


def test_default_disk_format_is_qcow2(images: dict[str, Path]) -> None:
    assert validate(images["qcow2-v3"]).ok
    assert not validate(images["raw-gpt"]).ok


def test_forced_format(images: dict[str, Path]) -> None:
    report = validate(images["raw-mbr"], disk_format=None, fmt="qcow2")
    assert report.format == "raw"
    assert "structure" in rules_of(report, "error")
    assert "not a qcow2 image" in report.errors[0].message
    # -f never hides what the content is: a qcow2 forced to raw is still checked as qcow2
    report = validate(images["qcow2-backing"], disk_format=None, fmt="raw")
    assert "backing-file" in rules_of(report, "error")
    with pytest.raises(InvalidArgument):
        validate(images["raw-mbr"], fmt="bogus")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(QcowlibIOError, match="no such file"):
        validate(tmp_path / "missing.qcow2")
    with pytest.raises(QcowlibIOError, match="directory"):
        validate(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(QcowlibIOError, match="not a regular file"):
        validate(fifo)


def test_package_is_callable(images: dict[str, Path]) -> None:
    package: Any = importlib.import_module("qcowlib.validate")
    report = package(images["qcow2-v3"], policy="glance", disk_format="qcow2")
    assert isinstance(report, ValidationReport) and report.ok
    assert report.to_json() == {"ok": True, "format": "qcow2", "findings": []}
    assert package.register is qcowlib_validate_register()


def qcowlib_validate_register() -> object:
    from qcowlib.validate import register

    return register


_TOP_LEVEL = """
import sys, qcowlib
first = sys.argv[1]
if first == "call":
    report = qcowlib.validate(sys.argv[2], disk_format="qcow2")
    import qcowlib.validate
else:
    import qcowlib.validate
    report = qcowlib.validate(sys.argv[2], disk_format="qcow2")
assert report.ok, report.human()
assert hasattr(qcowlib.validate, "register"), "qcowlib.validate is not the package"
"""


@pytest.mark.parametrize("order", ["call", "import"])
def test_top_level_validate_is_function_and_package(order: str, images: dict[str, Path]) -> None:
    """``qcowlib.validate(path)`` and ``qcowlib.validate.register`` both work, whichever
    comes first (the package is callable; qcowlib/__init__.py must export the package)."""
    import qcowlib

    if "validate" not in getattr(qcowlib, "__all__", ()):
        pytest.skip("qcowlib does not export validate yet")
    res = subprocess.run(
        [sys.executable, "-c", _TOP_LEVEL, order, str(images["qcow2-v3"])],
        capture_output=True,
        text=True,
        check=False,
    )
    if "is not the package" in res.stderr:
        pytest.xfail("qcowlib/__init__.py maps validate to the function, not the package")
    assert res.returncode == 0, res.stderr


def test_report_rendering(images: dict[str, Path]) -> None:
    report = validate(images["qcow2-dirty"], policy="strict")
    text = report.human()
    assert text.startswith(f"{images['qcow2-dirty']}: rejected by policy strict")
    assert "error   dirty:" in text and "[offset 0x48]" in text
    assert not report and report.errors and not report.warnings
    ok = validate(images["qcow2-v3"])
    assert "accepted" in ok.human() and "no findings" in ok.human()


def test_luks_message(images: dict[str, Path]) -> None:
    (f,) = validate(images["luks"], disk_format="raw").errors
    assert f.rule == "encrypted" and "LUKS" in f.message


def test_json_offsets_only_when_known(images: dict[str, Path]) -> None:
    for name in ("vmdk-monolithicFlat", "qcow2-backing", "raw-mbr-no-partitions"):
        for f in validate(images[name], disk_format="vmdk").findings:
            js = f.to_json()
            assert set(js) <= {"rule", "severity", "message", "offset"}
            assert ("offset" in js) == (f.offset is not None)


def _truncations(size: int) -> Iterator[int]:
    for n in (0, 1, 7, 8, 71, 72, 103, 104, 511, 512, 513, 1024, 4096, 65536, 65537):
        if n < size:
            yield n
    yield size // 2
    yield max(0, size - 1)
    yield max(0, size - 512)


def test_truncated_and_garbled_images_give_findings_not_tracebacks(
    images: dict[str, Path], tmp_path: Path
) -> None:
    """Every case image cut short, and with bytes flipped, still yields a report."""
    target = tmp_path / "cut"
    for name, path in images.items():
        data = path.read_bytes()
        variants = [data[:n] for n in sorted(set(_truncations(len(data))))]
        if len(data) > 600:
            flipped = bytearray(data)
            for at in range(0, min(len(data), 70000), 97):
                flipped[at] ^= 0xA5
            variants.append(bytes(flipped))
        for blob in variants:
            target.write_bytes(blob)
            for policy in ("glance", "strict", "permissive"):
                report = validate(target, policy=policy, disk_format=None)
                for f in report.findings:
                    assert isinstance(f, Finding)
                    assert "rule " + f.rule + " failed" not in f.message, (name, len(blob), f)
