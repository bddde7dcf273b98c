"""The bits of L1, L2 and refcount table entries (qcow2.txt, "Cluster mapping" and
"Host cluster management"), for code that decodes entries without numpy too."""

from __future__ import annotations

from typing import Final

#: Bits 9-55 of L1 and standard L2 entries hold a cluster-aligned host offset.
OFFSET_MASK: Final = 0x00FF_FFFF_FFFF_FE00
L1E_RESERVED_MASK: Final = 0x7F00_0000_0000_01FF
L2E_STD_RESERVED_MASK: Final = 0x3F00_0000_0000_01FE
OFLAG_COPIED: Final = 1 << 63
OFLAG_COMPRESSED: Final = 1 << 62
OFLAG_ZERO: Final = 1
#: Bits 9-63 of a refcount table entry: the refcount block's offset.
REFT_OFFSET_MASK: Final = 0xFFFF_FFFF_FFFF_FE00
#: Bits 0-8 of a refcount table entry are reserved.
REFT_RESERVED_MASK: Final = 0x1FF
