"""The ``glance`` policy against Glance's own inspector (oslo.utils ``format_inspector``).

For every image of :data:`images.CASES`, Glance's verdict is computed by replaying its
upload checks with oslo.utils (see :mod:`tests.validate.oslo`).  qcowlib must refuse
everything Glance refuses, and accept everything Glance accepts except the cases marked
``stricter`` (each says why).  Needs an interpreter with oslo.utils: the Glance venv from
``tools/glance-env`` or ``$QCOWLIB_OSLO_PYTHON``; skipped without one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qcowlib.validate import validate
from tests.validate.images import CASES
from tests.validate.oslo import oslo_python, oslo_verdicts

pytestmark = pytest.mark.usefixtures("qemu")


@pytest.fixture(scope="module")
def oslo() -> str:
    python = oslo_python()
    if python is None:
        pytest.skip("no interpreter with oslo.utils (run tools/glance-env)")
    return python


def test_glance_policy_matches_or_is_stricter_than_oslo(oslo: str, images: dict[str, Path]) -> None:
    verdicts = oslo_verdicts(oslo, [(str(images[c.name]), c.disk_format) for c in CASES])
    problems = []
    for case, (glance_ok, why) in zip(CASES, verdicts, strict=True):
        ours = validate(images[case.name], disk_format=case.disk_format)
        if glance_ok and not ours.ok and not case.stricter:
            problems.append(f"{case.name}: Glance accepts ({why}), qcowlib refuses")
        if not glance_ok and ours.ok:
            problems.append(f"{case.name}: Glance refuses ({why}), qcowlib accepts")
        if case.stricter and not glance_ok:
            problems.append(f"{case.name}: marked stricter but Glance refuses too ({why})")
    assert not problems, "\n".join(problems)
