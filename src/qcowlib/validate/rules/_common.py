"""What the built-in rules share: names, suggested commands, and problem reporting."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Final

from qcowlib.errors import QcowlibError
from qcowlib.validate import formats as fm
from qcowlib.validate.engine import Context
from qcowlib.validate.model import Finding

Findings = Iterator[Finding]

#: How findings name a format (qemu-img's names as keys).
NAMES: Final = {
    "qcow2": "qcow2",
    "vmdk": "VMDK",
    "vpc": "VHD",
    "vhdx": "VHDX",
    "vdi": "VDI",
    "iso": "ISO",
    "luks": "LUKS",
    "raw": "raw",
    "qcow": "qcow (v1)",
    "qed": "QED",
    "parallels": "Parallels",
}


def format_name(fmt: str) -> str:
    return NAMES.get(fmt, fmt)


def quote(text: str) -> str:
    import shlex  # only for messages

    return shlex.quote(text)


def out_name(path: str, suffix: str = "-flat.qcow2") -> str:
    base = os.path.basename(path) or "image"
    stem = base.rsplit(".", 1)[0] if "." in base[1:] else base
    directory = os.path.dirname(path)
    return os.path.join(directory, stem + suffix) if directory else stem + suffix


def flatten_cmd(ctx: Context) -> str:
    return f"`qcowlib flatten {quote(ctx.path)} {quote(out_name(ctx.path))}`"


def convert_cmd(ctx: Context, tool: str = "qcowlib", fmt: str = "qcow2") -> str:
    out = out_name(ctx.path, "-converted." + fmt)
    return f"`{tool} convert -O {fmt} {quote(ctx.path)} {quote(out)}`"


def human(n: int) -> str:
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    value = float(n)
    unit = 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{n} bytes"
    text = f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{text} {units[unit]} ({n} bytes)"


def shown_name(text: str) -> str:
    """A file name from inside an image, quoted and made safe to print."""
    return repr(fm.printable(text))


def describe(exc: QcowlibError) -> str:
    text = exc.message
    if exc.structure is not None:
        text += f" ({exc.structure}{'.' + exc.field if exc.field else ''})"
    return text


def report_problems(ctx: Context, fmt: str, problems: Iterable[fm.Problem]) -> Findings:
    """Structural findings for ``problems``: fatal ones are errors, others warnings."""
    for p in problems:
        text = f"{format_name(fmt)}: {p.message}"
        if p.fatal:
            yield ctx.error(text, p.offset, structural=True)
        else:
            yield ctx.warning(text, p.offset, structural=True)
