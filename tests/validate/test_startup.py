"""``validate`` of a small image imports neither numpy, nor thread pools, nor openstacksdk.

DESIGN.md: metadata-only commands stay light.  The qcow2 consistency check (the ``check``
rule) reads whole tables with numpy, so it is turned off here: what is asserted is that
validate itself, its rules and the header codecs it reads through load none of them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("qemu")

_CODE = """
import sys
from qcowlib.validate import get_policy, validate
report = validate(sys.argv[1], policy=get_policy("glance").replace(run_check=False),
                  disk_format=None)
assert report.ok or sys.argv[2] == "any", report.human()
heavy = ("numpy", "concurrent.futures", "openstack", "zstandard", "xxhash")
print(",".join(m for m in heavy if m in sys.modules))
"""


@pytest.mark.parametrize(
    ("name", "verdict"),
    [("qcow2-v3", "ok"), ("qcow2-backing", "any"), ("raw-gpt", "ok"), ("iso", "ok")],
)
def test_validate_stays_light(images: dict[str, Path], name: str, verdict: str) -> None:
    res = subprocess.run(
        [sys.executable, "-c", _CODE, str(images[name]), verdict],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""
