"""Where a DMG's mish blocks are stored: the XML property list or the resource fork.

Pure: :func:`blkx_from_plist` takes the property list's bytes, :func:`blkx_from_rsrc`
the binary resource fork's, and both return the mish blocks (the ``blkx`` resources)
in order.  Nothing here opens a file.

QEMU (``dmg_read_plist_xml``) base64-decodes every ``<data>`` element of the XML text
and keeps those that look like mish blocks.  qcowlib parses the property list with
:mod:`plistlib` (which refuses XML entity declarations, so no entity expansion) and
takes ``resource-fork`` / ``blkx`` / each entry's ``Data``: the same blocks for any
well-formed image, and a clear error for XML that is not a property list.

The binary resource fork (``dmg_read_resource_fork``): at its start the offset of the
resource data (u32 at 0) and its length (u32 at 8), big-endian; the data is a sequence
of resources, each a u32 length and that many bytes.
"""

from __future__ import annotations

import binascii
import plistlib
import struct
from typing import Any
from xml.parsers.expat import ExpatError

from qcowlib.errors import CorruptImage

__all__ = ["blkx_from_plist", "blkx_from_rsrc"]

_U32 = struct.Struct(">I")

#: Most XML tags (``<`` characters) a property list may have.  plistlib builds a
#: Python object per element (~400 bytes each): within the 16 MiB cap, a list of
#: millions of tiny elements took 600 MB and seconds to parse.  A real DMG's list has
#: a dozen elements per partition; this allows thousands of partitions.
DMG_XML_MAX_TAGS = 1 << 17
#: Most resources a binary resource fork may hold (a few per partition in real images;
#: 16 MiB of 5-byte resources was a loop of millions of them per open).
DMG_RSRC_MAX_RESOURCES = 1 << 16


def blkx_from_plist(xml: bytes) -> list[bytes]:
    """The ``Data`` of each ``resource-fork`` / ``blkx`` entry of an XML property list.

    Raises :class:`CorruptImage` for bytes that are not an XML property list, one of
    more than :data:`DMG_XML_MAX_TAGS` elements, or one whose ``blkx`` entries are not
    dictionaries with a ``Data`` field.
    """
    tags = xml.count(b"<")
    if tags > DMG_XML_MAX_TAGS:
        raise CorruptImage(
            f"the property list has {tags} XML elements, more than {DMG_XML_MAX_TAGS}",
            structure="dmg plist",
        )
    try:
        plist: Any = plistlib.loads(xml, fmt=plistlib.FMT_XML)
    except (plistlib.InvalidFileException, ExpatError, ValueError, TypeError,
            OverflowError, binascii.Error, UnicodeError) as exc:  # fmt: skip
        raise CorruptImage(
            f"the property list cannot be parsed ({exc})", structure="dmg plist"
        ) from None
    fork = plist.get("resource-fork") if isinstance(plist, dict) else None
    entries = fork.get("blkx") if isinstance(fork, dict) else None
    if not isinstance(entries, list):
        raise CorruptImage("the property list has no resource-fork/blkx", structure="dmg plist")
    blocks = []
    for i, entry in enumerate(entries):
        data = entry.get("Data") if isinstance(entry, dict) else None
        if not isinstance(data, bytes):
            raise CorruptImage(f"blkx entry {i} has no Data", structure="dmg plist")
        blocks.append(data)
    return blocks


def blkx_from_rsrc(fork: bytes, fork_offset: int) -> list[bytes]:
    """The resources in a binary resource fork (``fork``, read at ``fork_offset``).

    Checked as QEMU checks them: the data must lie inside the fork, and each resource
    must be non-empty and inside the data; at most :data:`DMG_RSRC_MAX_RESOURCES` of
    them.  Raises :class:`CorruptImage`.
    """
    if len(fork) < 12:
        raise _bad("the resource fork is too short", fork_offset)
    (start,) = _U32.unpack_from(fork, 0)
    (count,) = _U32.unpack_from(fork, 8)
    if start > len(fork) or count == 0 or start + count > len(fork):
        raise _bad("the resource data does not lie inside the resource fork", fork_offset)
    pos, end = start, start + count
    blocks: list[bytes] = []
    while pos < end:
        if end - pos < 4:
            raise _bad("a resource length is truncated", fork_offset + pos)
        (size,) = _U32.unpack_from(fork, pos)
        if size == 0 or size > end - pos - 4:
            raise _bad(f"resource of {size} bytes does not fit the data", fork_offset + pos)
        if len(blocks) == DMG_RSRC_MAX_RESOURCES:
            raise _bad(f"more than {DMG_RSRC_MAX_RESOURCES} resources", fork_offset + pos)
        blocks.append(fork[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return blocks


def _bad(message: str, offset: int) -> CorruptImage:
    return CorruptImage(message, structure="dmg resource fork", offset=offset)
