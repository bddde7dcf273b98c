"""A minimal PEP 517 build backend for the example hook package (wheels only).

It reads ``[project]`` from pyproject.toml (name, version, description,
requires-python, entry points) and ``[tool.hookpkg-build] py-modules``, and writes a
pure-Python wheel with its ``.dist-info``.  It exists so that the tests can run
``pip install --no-build-isolation`` without network access or setuptools' ``wheel``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import tomllib
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _project() -> tuple[dict[str, Any], list[str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data["project"], data["tool"]["hookpkg-build"]["py-modules"]


def _dist(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def get_requires_for_build_wheel(config_settings: Any = None) -> list[str]:
    return []


def build_wheel(
    wheel_directory: str, config_settings: Any = None, metadata_directory: Any = None
) -> str:
    project, modules = _project()
    dist, version = _dist(project["name"]), project["version"]
    info = f"{dist}-{version}.dist-info"
    metadata = (
        "Metadata-Version: 2.1\n"
        f"Name: {project['name']}\n"
        f"Version: {version}\n"
        f"Summary: {project.get('description', '')}\n"
        f"Requires-Python: {project.get('requires-python', '>=3')}\n"
    )
    entry_points = ""
    for group, items in project.get("entry-points", {}).items():
        entry_points += f"[{group}]\n"
        entry_points += "".join(f"{key} = {value}\n" for key, value in items.items())
    files: dict[str, bytes] = {
        f"{module}.py": (ROOT / f"{module}.py").read_bytes() for module in modules
    }
    files[f"{info}/METADATA"] = metadata.encode()
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: hookpkg_build\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n"
    )
    files[f"{info}/entry_points.txt"] = entry_points.encode()
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(Path(wheel_directory) / wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel
