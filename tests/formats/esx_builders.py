"""Test-side builders of the VMDK variants ESXi writes and qemu-img cannot create:
COWD (vmfsSparse) and seSparse extents and hand-written descriptors.

Written with ``struct`` straight from the layouts (QEMU ``block/vmdk.c``:
``VMDK3Header``, ``VMDKSESparseConstHeader``/``VolatileHeader``), independent of
qcowlib's codecs, so that qemu-img reading the same file is the oracle.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path

SECTOR = 512


def descriptor(
    create_type: str,
    extents: list[str],
    *,
    cid: int = 0x1234ABCD,
    parent_cid: int = 0xFFFFFFFF,
    parent: str | None = None,
) -> bytes:
    """A descriptor as ESXi writes one (``extents`` are whole extent lines)."""
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        'encoding="UTF-8"',
        f"CID={cid:08x}",
        f"parentCID={parent_cid:08x}",
        f'createType="{create_type}"',
    ]
    if parent is not None:
        lines.append(f'parentFileNameHint="{parent}"')
    lines += ["", "# Extent description", *extents, "", "# The Disk Data Base", "#DDB", ""]
    lines += ['ddb.adapterType = "lsilogic"', 'ddb.virtualHWVersion = "14"', ""]
    return "\n".join(lines).encode()


def cowd(
    capacity: int,
    grains: Mapping[int, bytes],
    *,
    granularity: int = 1,
    l1dir_size: int | None = None,
    text: bytes = b"",
    gd_entries: Mapping[int, int] | None = None,
) -> bytes:
    """A COWD extent of ``capacity`` sectors with data in ``grains`` (grain -> bytes).

    Header (2 KiB, ``text`` at 0x200), grain directory at sector 4, then one 4096-entry
    table for each directory entry that covers a grain in ``grains``, then the grains in
    the order given.  ``gd_entries`` overrides directory entries (hostile cases).
    """
    per_gt = 4096 * granularity
    needed = -(-capacity // per_gt)
    size = needed if l1dir_size is None else l1dir_size
    gd_sec = 4
    gt_sec = gd_sec + -(-size * 4 // SECTOR)
    head = b"COWD" + struct.pack("<10I", 1, 3, capacity, granularity, gd_sec, size, 0, 0, 0, 0)
    out = bytearray(head.ljust(0x200, b"\0") + text.ljust(0x600, b"\0"))
    out = out.ljust(gt_sec * SECTOR, b"\0")
    tables = sorted({g // 4096 for g in grains})
    gd = [0] * size
    for n, t in enumerate(tables):
        gd[t] = gt_sec + n * 32  # 16 KiB tables
    for i, v in (gd_entries or {}).items():
        gd[i] = v
    struct.pack_into(f"<{size}I", out, gd_sec * SECTOR, *gd)
    out = out.ljust((gt_sec + 32 * len(tables)) * SECTOR, b"\0")
    for g, data in grains.items():
        sector = len(out) // SECTOR
        out += data.ljust(granularity * SECTOR, b"\0")
        struct.pack_into("<I", out, gd[g // 4096] * SECTOR + 4 * (g % 4096), sector)
    return bytes(out)


SE_ZERO = 0x2000000000000000
SE_UNMAPPED = 0x1000000000000000


def sesparse(
    capacity: int,
    grains: Mapping[int, bytes | int],
    *,
    replay_journal: int = 0,
    version: int = 0x0000000200000001,
    gd_sectors: int | None = None,
    gd_entries: Mapping[int, int] | None = None,
    first_cluster: int = 0,
) -> bytes:
    """A seSparse extent of ``capacity`` sectors: ``grains`` maps a grain (4 KiB) to its
    data, or to a raw grain table entry (an int: :data:`SE_ZERO`, :data:`SE_UNMAPPED`,
    or anything for hostile cases).

    Layout: const header, volatile header at sector 1, directory at sector 8, 32 KiB
    grain tables, then 4 KiB grains numbered from ``grains_offset``.
    """
    per_gt = 4096 * 8
    needed = -(-capacity // per_gt)
    dir_secs = gd_sectors if gd_sectors is not None else max(1, -(-needed * 8 // SECTOR))
    gd_off = 8
    gt_off = gd_off + dir_secs
    tables = sorted({g // 4096 for g in grains})
    n_data = sum(1 for v in grains.values() if isinstance(v, bytes))
    grains_off = gt_off + 64 * len(tables)
    fields = [0xCAFEBABE, version, capacity, 8, 64, 0, 0, 0, 0, 0]
    fields += [1, 1, 2, 1, 3, 5]  # volatile header, journal header, journal
    fields += [gd_off, dir_secs, gt_off, 64 * max(1, len(tables))]
    fields += [0, 0, 0, 0, grains_off, 8 * n_data]  # free bitmap, back map, grains
    out = bytearray(struct.pack("<26Q", *fields).ljust(SECTOR, b"\0"))
    out += struct.pack("<4Q", 0xCAFECAFE, len(tables), 1, replay_journal).ljust(SECTOR, b"\0")
    out = out.ljust((grains_off + 8 * first_cluster) * SECTOR, b"\0")
    gd = {t: 0x1000000000000000 | n for n, t in enumerate(tables)}
    gd.update(gd_entries or {})
    for i, v in gd.items():
        struct.pack_into("<Q", out, gd_off * SECTOR + 8 * i, v)
    cluster = first_cluster
    for g, value in grains.items():
        if isinstance(value, bytes):
            out += value.ljust(8 * SECTOR, b"\0")
            value = 0x3000000000000000 | ((cluster & 0xFFF) << 48) | (cluster >> 12)
            cluster += 1
        t = tables.index(g // 4096)
        struct.pack_into("<Q", out, (gt_off + 64 * t) * SECTOR + 8 * (g % 4096), value)
    return bytes(out)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
