"""``validate`` of a small image imports neither numpy, nor thread pools, nor openstacksdk.

DESIGN.md: metadata-only commands stay light.  The whole ``glance`` policy runs, the
qcow2 consistency check (the ``check`` rule) included: for a small, plain qcow2 it is
answered by the check's plain pass, without numpy.  The entry points of third-party rules
are listed without ``importlib.metadata``, and no header is parsed with construct.
(tests/formats/test_registry.py asserts the same of the command line, with
``python -X importtime``.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("qemu")

_CODE = """
import sys
from qcowlib.validate import validate
report = validate(sys.argv[1], disk_format=None)
assert report.ok or sys.argv[2] == "any", report.human()
heavy = ("numpy", "concurrent.futures", "openstack", "zstandard", "xxhash", "construct",
         "importlib.metadata")
print(",".join(m for m in heavy if m in sys.modules))
"""


@pytest.mark.parametrize(
    ("name", "verdict"),
    [
        ("qcow2-v3", "ok"),
        ("qcow2-v2", "ok"),
        ("qcow2-data", "ok"),
        ("qcow2-zstd", "ok"),
        ("qcow2-backing", "any"),
        ("raw-gpt", "ok"),
        ("iso", "ok"),
    ],
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
