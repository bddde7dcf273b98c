"""Sizes: parsing ``10G``-style strings, alignment helpers and documented caps; the value
types of ``-o`` options as QEMU's QemuOpts parses them."""

from __future__ import annotations

import re

from qcowlib.errors import InvalidArgument

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
PiB = 1024 * TiB
EiB = 1024 * PiB

#: qemu-img's limit on a virtual disk size (QCOW_MAX_VIRTUAL_SIZE-like bound; INT64_MAX
#: rounded down to a 512-byte sector).
MAX_VIRTUAL_SIZE = (2**63 - 1) & ~511

_SUFFIXES = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB, "p": PiB, "e": EiB}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([bBkKmMgGtTpPeE]?)\s*$")


def parse_size(text: str) -> int:
    """Parse a size as qemu-img does: bytes, or a number with a ``b k m g t p e`` suffix.

    Suffixes are powers of 1024 and case-insensitive; a fraction is allowed with a
    suffix (``1.5G``).  Raises :class:`InvalidArgument` for anything else.
    """
    m = _SIZE_RE.match(text)
    if m is None:
        raise InvalidArgument(f"invalid size {text!r}: use bytes or a k/M/G/T/P/E suffix")
    number, suffix = m.groups()
    mult = _SUFFIXES[suffix.lower()]
    if "." in number:
        if mult == 1:
            raise InvalidArgument(f"invalid size {text!r}: a fraction needs a unit suffix")
        whole, frac = number.split(".")
        value = int(whole) * mult + (int(frac) * mult) // (10 ** len(frac))
    else:
        value = int(number) * mult
    if value > MAX_VIRTUAL_SIZE:
        raise InvalidArgument(f"size {text!r} is too large")
    return int(value)


def align_up(value: int, alignment: int) -> int:
    """Round ``value`` up to a multiple of ``alignment`` (a power of two or not)."""
    return -(-value // alignment) * alignment


def align_down(value: int, alignment: int) -> int:
    """Round ``value`` down to a multiple of ``alignment``."""
    return value - value % alignment


def div_round_up(value: int, divisor: int) -> int:
    """Integer division rounding up."""
    return -(-value // divisor)


def human_size(value: int) -> str:
    """Render bytes as qemu-img's human output does (``1 GiB``, ``192 KiB``, ``1.5 MiB``)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    size = float(value)
    unit = 0
    while size >= 1024 and unit < len(units) - 1:
        size /= 1024
        unit += 1
    if unit == 0:
        return f"{value} B"
    # qemu prints with %0.3g, trimming trailing zeros
    return f"{size:.3g} {units[unit]}"


# -- ``-o`` option values, as QemuOpts types them (util/qemu-option.c) ---------------------
_QEMU_TRUE = ("on", "yes", "true", "y")
_QEMU_FALSE = ("off", "no", "false", "n")
_HEX_RE = re.compile(r"^\s*0[xX][0-9a-fA-F]+\s*$")
_OCTAL_RE = re.compile(r"^\s*0[0-7]+\s*$")


def parse_option_bool(key: str, value: str) -> bool:
    """QEMU's ``qapi_bool_parse``: lower case only."""
    if value in _QEMU_TRUE:
        return True
    if value in _QEMU_FALSE:
        return False
    raise InvalidArgument(f"Parameter '{key}' expects 'on' or 'off'")


def parse_option_number(key: str, value: str) -> int:
    """QemuOpts' number type: ``strtoull`` with base 0 (negative values wrap)."""
    text = value.strip()
    try:
        number = int(text, 8) if _OCTAL_RE.match(text) else int(text, 0)
    except ValueError:
        raise InvalidArgument(f"Parameter '{key}' expects a number") from None
    if number >= 1 << 64 or number <= -(1 << 64):
        raise InvalidArgument(f"Parameter '{key}' expects a number")
    return number % (1 << 64)


def parse_option_size(key: str, value: str) -> int:
    """QemuOpts' size type: bytes with an optional ``k M G T P E`` suffix, or hex."""
    if _HEX_RE.match(value):
        return int(value, 16)
    try:
        return parse_size(value)
    except InvalidArgument:
        raise InvalidArgument(
            f"Parameter '{key}' expects a non-negative number below 2^64 (optional suffix "
            "k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes)"
        ) from None


def split_qemu_opts(text: str) -> list[str]:
    """Split at single commas; ``,,`` stands for a comma inside a value (QemuOpts)."""
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    items.append("".join(current))
    return items
