"""VHD dynamic disk header and parent locators."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import construct as cs

from qcowlib.errors import (
    CorruptImage,
    FormatError,
    QcowlibError,
    TruncatedImage,
)
from qcowlib.formats.vhd.footer import (
    DYNAMIC_HEADER,
    DYNAMIC_HEADER_CHECKSUM_AT,
    DYNAMIC_HEADER_SIZE,
    SECTOR,
    VHD_DYNAMIC_COOKIE,
    VHD_MAX_TABLE_ENTRIES,
    Footer,
    _parse,
    dynamic_header_checksum,
)

if TYPE_CHECKING:
    # numpy is imported where tables are decoded, so that header work stays light.
    import numpy as np
    import numpy.typing as npt

    BatArray = npt.NDArray[np.uint32]


# ---------------------------------------------------------------------------------------
# dynamic disk header


@dataclass(frozen=True)
class DynamicHeader:
    """The dynamic disk header (spec "Dynamic Disk Header Format"; QEMU ``VHDDynDiskHeader``)."""

    data_offset: int
    table_offset: int
    version: int
    max_table_entries: int
    block_size: int
    checksum: int
    parent_uuid: bytes = bytes(16)
    parent_timestamp: int = 0
    #: Raw UTF-16 big-endian parent name (512 bytes, NUL padded).
    parent_name: bytes = bytes(512)
    #: ``(platform, data_space, data_length, data_offset)`` for each of the 8 locators.
    parent_locators: tuple[tuple[bytes, int, int, int], ...] = ((bytes(4), 0, 0, 0),) * 8

    @property
    def parent_name_text(self) -> str:
        return self.parent_name.decode("utf-16-be", "replace").split("\0", 1)[0]


def parse_dynamic_header(data: bytes, offset: int = 0) -> DynamicHeader:
    """Parse a 1024-byte dynamic disk header found at file ``offset``.

    The checksum is not enforced (QEMU does not check it); compare ``checksum`` with
    :func:`dynamic_header_checksum` to know.  Raises :class:`TruncatedImage` for short
    data and :class:`FormatError` without the ``cxsparse`` cookie.
    """
    h = _parse(DYNAMIC_HEADER, data, DYNAMIC_HEADER_SIZE, "vhd dynamic header", offset)
    if h.magic != VHD_DYNAMIC_COOKIE:
        raise FormatError(
            "VHD dynamic disk header cookie 'cxsparse' is missing",
            structure="vhd dynamic header",
            field="magic",
            offset=offset,
        )
    return DynamicHeader(
        data_offset=h.data_offset,
        table_offset=h.table_offset,
        version=h.version,
        max_table_entries=h.max_table_entries,
        block_size=h.block_size,
        checksum=h.checksum,
        parent_uuid=h.parent_uuid,
        parent_timestamp=h.parent_timestamp,
        parent_name=h.parent_name,
        parent_locators=tuple(
            (loc.platform, loc.data_space, loc.data_length, loc.data_offset)
            for loc in h.parent_locators
        ),
    )


def build_dynamic_header(h: DynamicHeader) -> bytes:
    """The 1024 bytes of ``h`` with a freshly computed checksum (``h.checksum`` ignored)."""
    try:
        raw = DYNAMIC_HEADER.build(
            {
                "magic": VHD_DYNAMIC_COOKIE,
                "data_offset": h.data_offset,
                "table_offset": h.table_offset,
                "version": h.version,
                "max_table_entries": h.max_table_entries,
                "block_size": h.block_size,
                "checksum": 0,
                "parent_uuid": h.parent_uuid,
                "parent_timestamp": h.parent_timestamp,
                "reserved": 0,
                "parent_name": h.parent_name,
                "parent_locators": [
                    {
                        "platform": p,
                        "data_space": space,
                        "data_length": length,
                        "reserved": 0,
                        "data_offset": off,
                    }
                    for p, space, length, off in h.parent_locators
                ],
            }
        )
    except cs.ConstructError as exc:
        raise FormatError(
            f"cannot build vhd dynamic header: {exc}", structure="vhd dynamic header"
        ) from None
    out = bytearray(raw.ljust(DYNAMIC_HEADER_SIZE, b"\0"))
    at = DYNAMIC_HEADER_CHECKSUM_AT
    out[at : at + 4] = dynamic_header_checksum(out).to_bytes(4, "big")
    return bytes(out)


def bitmap_size(block_size: int) -> int:
    """Bytes of the sector bitmap before each block, padded to whole sectors."""
    return -(-(block_size // (8 * SECTOR)) // SECTOR) * SECTOR


def dynamic_header_offset(footer: Footer, file_size: int) -> int:
    """Where the dynamic disk header of ``footer``'s disk is (its ``data_offset``).

    Raises :class:`TruncatedImage` when the header would end past the end of the file.
    """
    at = footer.data_offset
    if at > file_size - DYNAMIC_HEADER_SIZE:
        raise TruncatedImage(
            "VHD dynamic disk header lies past the end of the file",
            structure="vhd footer",
            field="data_offset",
            offset=16,
        )
    return at


def dynamic_problems(
    h: DynamicHeader, disk_size: int, file_size: int, offset: int = 0
) -> list[QcowlibError]:
    """Everything ``vpc_open`` refuses in a dynamic header, in the order it looks.

    ``disk_size`` is the virtual size (:func:`virtual_size`), ``offset`` where the header
    is in the file.  Returns :class:`CorruptImage` for a bad block size, a BAT that is
    too small for the disk or larger than :data:`VHD_MAX_TABLE_ENTRIES`, and
    :class:`TruncatedImage` when the BAT lies past the end of the file; the later checks
    are skipped when the block size or the table size is unusable.
    """
    what = "vhd dynamic header"
    bs = h.block_size
    if bs < SECTOR or bs & (bs - 1):
        return [
            CorruptImage(
                f"VHD block size {bs} is not a power of two of at least 512",
                structure=what,
                field="block_size",
                offset=offset + 32,
            )
        ]
    if disk_size // bs > 0xFFFFFFFF:
        return [CorruptImage("VHD has too many blocks", structure=what, field="block_size")]
    if h.max_table_entries > VHD_MAX_TABLE_ENTRIES:
        return [
            CorruptImage(
                f"VHD block table of {h.max_table_entries} entries is too large",
                structure=what,
                field="max_table_entries",
                offset=offset + 28,
            )
        ]
    problems: list[QcowlibError] = []
    if h.max_table_entries * bs < disk_size:
        problems.append(
            CorruptImage(
                f"VHD block table ({h.max_table_entries} blocks of {bs} bytes) is too small "
                f"for the disk size {disk_size}",
                structure=what,
                field="max_table_entries",
                offset=offset + 28,
            )
        )
    if h.table_offset + h.max_table_entries * 4 > file_size:
        problems.append(
            TruncatedImage(
                "VHD block allocation table lies past the end of the file",
                structure=what,
                field="table_offset",
                offset=h.table_offset,
            )
        )
    return problems


def check_dynamic(h: DynamicHeader, disk_size: int, file_size: int, offset: int = 0) -> None:
    """What ``vpc_open`` refuses in a dynamic header, before anything is allocated.

    Raises the first of :func:`dynamic_problems`.
    """
    problems = dynamic_problems(h, disk_size, file_size, offset)
    if problems:
        raise problems[0]


#: Parent locator platform codes, most useful first: a relative Windows path, an
#: absolute one, a macOS file URL (spec "Parent Locator Entry"; Hyper-V writes W2ru and
#: W2ku, Virtual PC for Mac writes MacX).
LOCATOR_PLATFORMS: Final = (b"W2ru", b"W2ku", b"MacX")
#: A locator longer than this is not a path (Windows paths stop at 32,767 characters).
MAX_LOCATOR_BYTES: Final = 65536


def parent_locators(h: DynamicHeader, file_size: int) -> list[tuple[bytes, int, int]]:
    """``(platform, file offset, length)`` of the usable parent locators, best first.

    Locators whose data lies past the end of the file or is too long are skipped (a
    differencing disk whose parent cannot be named is refused by the reader).
    """
    found = [
        (platform, off, length)
        for platform, _space, length, off in h.parent_locators
        if platform in LOCATOR_PLATFORMS
        and 0 < length <= MAX_LOCATOR_BYTES
        and off + length <= file_size
    ]
    return sorted(found, key=lambda p: LOCATOR_PLATFORMS.index(p[0]))


def locator_path(platform: bytes, data: bytes) -> str | None:
    """The parent's file name a locator's data gives, as a POSIX path (None: unusable).

    Windows paths (``.\\base.vhd``) get forward slashes; an absolute Windows path
    (``C:\\VMs\\base.vhd``) cannot name a file here, so only its last component is kept
    (the parent is looked for beside the child, as Hyper-V's relative locator says).
    """
    if platform == b"MacX":
        text = data.decode("utf-8", "replace").split("\0", 1)[0]
        return text.removeprefix("file://localhost").removeprefix("file://") or None
    text = data.decode("utf-16-le", "replace").split("\0", 1)[0].replace("\\", "/")
    if platform == b"W2ku":
        text = text.rsplit("/", 1)[-1]
    text = text.removeprefix("./")
    return text or None


def parent_name_path(h: DynamicHeader) -> str | None:
    """The parent's name from the header's Unicode name field (its last component)."""
    text = h.parent_name_text.replace("\\", "/").rsplit("/", 1)[-1]
    return text or None
