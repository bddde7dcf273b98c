"""``validate`` is never laxer than opening (contract, "Exit status").

Differential over every image of :data:`tests.validate.images.CASES`: whatever the
opener (:mod:`qcowlib.formats.opener`, which ``convert`` uses) refuses is rejected by
``validate`` under every built-in policy, with the opener's reason when no other rule
rejects it first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qcowlib.core.chain import BackingPolicy
from qcowlib.errors import BackingChainError, QcowlibError
from qcowlib.formats.opener import open_disk
from qcowlib.validate import validate
from qcowlib.validate.policy import get_policy
from tests.conftest import cli, qemu_img
from tests.validate.images import CASES, or_byte

ALONE = BackingPolicy(follow=False, follow_data_file=False)


def _open_error(path: Path) -> QcowlibError | None:
    try:
        open_disk(str(path), None, ALONE).close()
    except BackingChainError:
        return None
    except QcowlibError as exc:
        return exc
    return None


@pytest.mark.parametrize("policy", ["glance", "strict", "permissive"])
def test_what_does_not_open_is_rejected(images: dict[str, Path], policy: str) -> None:
    refused = 0
    for case in CASES:
        path = images[case.name]
        if _open_error(path) is None:
            continue
        refused += 1
        report = validate(path, policy, case.disk_format)
        assert not report.ok, (case.name, policy, report.human())
    assert refused >= 3  # the table has images the opener refuses (LUKS, qcow1, ...)


@pytest.fixture
def unknown_bit(tmp_path: Path) -> Path:
    """A qcow2 image with an incompatible feature bit no one knows (bit 5)."""
    path = tmp_path / "bit5.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    or_byte(path, 0x48 + 7, 0x20)
    return path


def test_a_rule_turned_off_does_not_make_validate_laxer_than_opening(
    unknown_bit: Path,
) -> None:
    """A site policy that silences ``unknown-features`` (every other rule passes this
    image) still rejects it: it does not open, and the reason is convert's own."""
    res = cli("convert", "-O", "raw", unknown_bit, unknown_bit.with_suffix(".raw"))
    assert res.returncode == 1 and "bits 0x20" in res.stderr
    silenced = get_policy("glance").replace(
        name="site-no-features", severities={"unknown-features": "off"}
    )
    report = validate(unknown_bit, silenced, "qcow2")
    assert not report.ok
    (err,) = report.errors
    assert err.rule == "readable" and err.offset == 0x48
    assert "convert" in err.message
    assert "unsupported incompatible qcow2 features: bits 0x20" in err.message
    # Without the readable check the rules alone accepted it (what validate did before).
    assert [f.rule for f in report.findings] == ["readable"]


def test_an_image_that_opens_gets_no_readable_finding(images: dict[str, Path]) -> None:
    report = validate(images["qcow2-v3"], "glance", "qcow2")
    assert report.ok and not report.findings
