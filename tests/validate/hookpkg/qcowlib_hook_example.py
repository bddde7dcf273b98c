"""Example site rules for ``qcowlib validate``, loaded through the ``qcowlib.validators``
entry-point group (see pyproject.toml beside this file)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from qcowlib.validate import Context, Finding, rule

#: File name extensions and the formats they promise.
EXTENSIONS = {".qcow2": "qcow2", ".raw": "raw", ".img": "raw", ".vmdk": "vmdk", ".vhd": "vpc"}


@rule("example-qcow2-v3-only", formats=["qcow2"])
def qcow2_v3_only(ctx: Context) -> Iterator[Finding]:
    """Site rule: qcow2 images must be version 3 (compat 1.1)."""
    fields = ctx.qcow2_fields()
    if fields.version == 2:
        yield ctx.error(
            "this qcow2 is version 2 (compat 0.10), which this site no longer takes; "
            f"upgrade it: `qemu-img amend -o compat=1.1 {ctx.path}`",
            offset=4,
        )


def check_file_name(ctx: Context) -> list[Finding]:
    """Site rule: the file name's extension matches the content."""
    ext = os.path.splitext(ctx.path)[1].lower()
    promised = EXTENSIONS.get(ext)
    if promised is None or promised == ctx.format:
        return []
    return [ctx.warning(f"the file name says {promised} ({ext}) but the content is {ctx.format}")]
