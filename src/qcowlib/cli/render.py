"""Human renderers that print what qemu-img prints for the same data."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qcowlib.ops.map import MapEntry


def size_to_str(value: int) -> str:
    """qemu's ``size_to_str``: ``%0.3g`` of the value in the unit it reaches past 1000."""
    suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    i = 0
    scaled = value / (1000.0 / 1024.0)
    while scaled >= 1024 and i < len(suffixes) - 1:
        scaled /= 1024
        i += 1
    return f"{_g3(value / (1 << (10 * i)))} {suffixes[i]}B"


def _g3(x: float) -> str:
    return f"{x:0.3g}"


def _dump_value(key: str, value: Any, indent: int, out: list[str]) -> None:
    pad = " " * indent
    name = key.replace("-", " ")
    if isinstance(value, dict):
        out.append(f"{pad}{name}:")
        for k, v in value.items():
            _dump_value(k, v, indent + 4, out)
    elif isinstance(value, list):
        out.append(f"{pad}{name}:")
        for i, item in enumerate(value):
            _dump_value(f"[{i}]", item, indent + 4, out)
    elif isinstance(value, bool):
        out.append(f"{pad}{name}: {'true' if value else 'false'}")
    else:
        out.append(f"{pad}{name}: {value}")


def snapshot_lines(snaps: list[dict[str, Any]]) -> list[str]:
    lines = ["Snapshot list:"]
    lines.append(f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}")
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        secs = s["vm-clock-sec"]
        clock = (
            f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
            f"{s['vm-clock-nsec'] // 1_000_000:03d}"
        )
        icount = str(s["icount"]) if "icount" in s else ""
        lines.append(
            f"{s['id']:<9} {s['name']:<16} {size_to_str(s['vm-state-size']):>8}"
            f"{date:>20}{clock:>13}{icount:>11}"
        )
    return lines


def human_info(info: dict[str, Any]) -> str:
    """``qemu-img info`` human output for one image."""
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
    ]
    if "actual-size" in info:
        lines.append(f"disk size: {size_to_str(info['actual-size'])}")
    else:
        lines.append("disk size: unavailable")
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is not None and full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
    if "backing-filename-format" in info:
        lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.extend(snapshot_lines(info["snapshots"]))
    spec = info.get("format-specific")
    if spec is not None:
        lines.append("Format specific information:")
        for k, v in spec["data"].items():
            _dump_value(k, v, 4, lines)
    return "\n".join(lines) + "\n"


def _hex(value: int) -> str:
    # C's "%#x" prints 0 without the 0x prefix.
    return f"{value:#x}" if value else "0"


#: Map entries rendered per write: output streams (qemu-img prints entry by entry; a
#: fragmented image has millions of entries), without a write call per entry.
MAP_BATCH = 4096


def write_human_map(entries: Iterable[MapEntry], write: Callable[[str], object]) -> str | None:
    """Write ``qemu-img map`` human output as the entries come; returns the error message
    when it must stop early.  What was found before an error (the message, or an
    exception raised by ``entries``) is written, as qemu-img prints line by line."""
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    error = None
    try:
        for e in entries:
            if e.data and e.offset is None:
                error = "File contains external, encrypted or compressed clusters."
                break
            if e.data and not e.zero:
                lines.append(
                    f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset or 0):<16}"
                    f"{e.filename or ''}"
                )
                if len(lines) >= MAP_BATCH:
                    write("\n".join(lines) + "\n")
                    lines.clear()
    finally:
        if lines:
            write("\n".join(lines) + "\n")
    return error


def write_map_json(entries: Iterable[MapEntry], write: Callable[[str], object]) -> None:
    """Write ``qemu-img map --output json`` as the entries come, byte for byte (one entry
    per line).  An exception raised by ``entries`` leaves what qemu-img leaves: ``[`` and
    every entry found before it, each followed by ``,`` and a newline, the list unclosed."""
    rows: list[str] = []
    lead = "["
    try:
        for e in entries:
            row = (
                f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth},'
                f' "present": {_js(e.present)}, "zero": {_js(e.zero)}, "data": {_js(e.data)}'
            )
            if e.offset is not None:
                row += f', "offset": {e.offset}'
            rows.append(row + "}")
            if len(rows) >= MAP_BATCH:
                write(lead + ",\n".join(rows))
                lead = ",\n"
                rows.clear()
    except BaseException:
        # qemu-img prints an entry (and ",\n") once the next is known; the one being
        # merged when the error came is lost there too.
        write(lead + "".join(row + ",\n" for row in rows) if rows else lead)
        raise
    if rows:
        write(lead + ",\n".join(rows) + "]\n")
    else:
        write("[]\n" if lead == "[" else "]\n")


def _js(flag: bool) -> str:
    return "true" if flag else "false"


#: Chains longer than this are shown by their ends (``--debug`` shows every image).
CHAIN_SHOWN = 8


def describe_chain(chain: Sequence[tuple[str, str]], *, every: bool = False) -> str:
    """The chain a command reads, top first, one image a line (for stderr)::

    reading 3 images (top first):
      top.qcow2 (qcow2)
      base.qcow2 (qcow2)
    """
    rows = [f"  {name} ({fmt})" for name, fmt in chain]
    if not every and len(rows) > CHAIN_SHOWN:
        half = CHAIN_SHOWN // 2
        rows = [*rows[:half], f"  ... {len(rows) - 2 * half} more ...", *rows[-half:]]
    noun = "image" if len(chain) == 1 else "images"
    return f"reading {len(chain)} {noun} (top first):\n" + "\n".join(rows) + "\n"
