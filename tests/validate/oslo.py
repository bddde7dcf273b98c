"""Glance 33's verdict on a file, computed by oslo.utils' format inspector.

The harness below runs in an interpreter that has oslo.utils (the Glance venv made by
``tools/glance-env``, or ``$QCOWLIB_OSLO_PYTHON``) and replays what Glance's
``ImageProxy.set_data`` does with an upload of ``container_format=bare``: stream the
bytes through ``InspectWrapper`` in 64 KiB chunks, pick the detected format (iso wins
over iso+gpt), compare it with the declared ``disk_format`` as
``require_image_format_match`` does, and run the inspector's safety checks.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

HARNESS = r"""
import json, sys
from oslo_utils.imageutils import format_inspector as fi

def verdict(path, disk_format):
    with open(path, "rb") as f:
        wrapper = fi.InspectWrapper(f)
        try:
            while wrapper.read(65536):
                pass
        except fi.ImageFormatError as exc:
            return False, f"format error: {exc}"
        wrapper.close()
    inspector = None
    try:
        matched = {str(i): i for i in wrapper.formats}
        if matched.keys() == {"iso", "gpt"}:
            inspector = matched["iso"]
        else:
            inspector = wrapper.format
        fmt = str(inspector)
        if fmt == disk_format:
            pass
        elif fmt == "raw" and disk_format not in fi.ALL_FORMATS:
            pass
        elif disk_format == "raw":
            pass
        else:
            raise fi.ImageFormatError(f"disk_format {disk_format} does not match {fmt}")
        inspector.safety_check()
    except AttributeError as exc:
        return True, f"not inspected ({exc})"
    except fi.ImageFormatError as exc:
        return False, f"format error: {exc}"
    except fi.SafetyCheckFailed as exc:
        fatal = set(exc.failures)
        if disk_format in ("aki", "ari"):
            fatal.discard("mbr")
        if inspector is not None and inspector.NAME == "gpt" and not fatal:
            return True, f"non-fatal {exc}"
        return False, f"safety: {','.join(sorted(exc.failures))}"
    except Exception as exc:
        return False, f"inspection failed: {type(exc).__name__}: {exc}"
    return True, str(inspector)

cases = json.load(sys.stdin)
json.dump([verdict(p, d) for p, d in cases], sys.stdout)
"""


def oslo_python() -> str | None:
    """An interpreter with oslo.utils, if this machine has one."""
    candidates = [os.environ.get("QCOWLIB_OSLO_PYTHON"), str(ROOT / ".venv-glance/bin/python")]
    for python in candidates:
        if not python or not Path(python).exists():
            continue
        probe = subprocess.run(
            [python, "-c", "import oslo_utils.imageutils.format_inspector"],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return python
    return None


def oslo_verdicts(python: str, cases: list[tuple[str, str]]) -> list[tuple[bool, str]]:
    """``(accepted, why)`` for each ``(path, disk_format)``."""
    res = subprocess.run(
        [python, "-c", HARNESS],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return [(bool(ok), str(why)) for ok, why in json.loads(res.stdout)]
