"""Test-side builders of the VMDK variants ESXi writes and qemu-img cannot create:
COWD (vmfsSparse) and seSparse extents and hand-written descriptors.

Written with ``struct`` straight from the layouts (QEMU ``block/vmdk.c``:
``VMDK3Header``, ``VMDKSESparseConstHeader``/``VolatileHeader``), independent of
qcowlib's codecs, so that qemu-img reading the same file is the oracle.

An extent is built as a :class:`Sparse` layout (its size and the pieces that are not
zeros), so that large extents (thousands of grain tables, tens of GiB of capacity) can
be written as sparse files (:meth:`Sparse.write`) in a few MiB; :func:`cowd` and
:func:`sesparse` return the same layouts as bytes for small ones.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

SECTOR = 512


class Sparse(NamedTuple):
    """A file of ``size`` bytes: zeros except ``pieces`` (offset, bytes)."""

    size: int
    pieces: list[tuple[int, bytes]]

    def to_bytes(self) -> bytes:
        out = bytearray(self.size)
        for at, data in self.pieces:
            out[at : at + len(data)] = data
        return bytes(out)

    def write(self, path: Path) -> Path:
        """Write as a sparse file: only the pieces take space."""
        with path.open("wb") as f:
            f.truncate(self.size)
            for at, data in self.pieces:
                os.pwrite(f.fileno(), data, at)
        return path


def _table_pieces(entries: Mapping[int, int], fmt: str) -> list[tuple[int, bytes]]:
    """Table entries (file offset -> value) as pieces, one per run of adjacent entries."""
    size = struct.calcsize(fmt)
    pieces: list[tuple[int, bytes]] = []
    run: list[int] = []
    at = -1
    for off in sorted(entries):
        if run and off != at + size * len(run):
            pieces.append((at, struct.pack(f"<{len(run)}{fmt}", *run)))
            run = []
        if not run:
            at = off
        run.append(entries[off])
    if run:
        pieces.append((at, struct.pack(f"<{len(run)}{fmt}", *run)))
    return pieces


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
    """A COWD extent as bytes (see :func:`cowd_layout`)."""
    return cowd_layout(
        capacity,
        grains,
        granularity=granularity,
        l1dir_size=l1dir_size,
        text=text,
        gd_entries=gd_entries,
    ).to_bytes()


def cowd_layout(
    capacity: int,
    grains: Mapping[int, bytes],
    *,
    granularity: int = 1,
    l1dir_size: int | None = None,
    text: bytes = b"",
    gd_entries: Mapping[int, int] | None = None,
) -> Sparse:
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
    pieces = [(0, head.ljust(0x200, b"\0") + text.ljust(0x600, b"\0"))]
    tables = sorted({g // 4096 for g in grains})
    gd: dict[int, int] = {t: gt_sec + n * 32 for n, t in enumerate(tables)}  # 16 KiB tables
    gd.update(gd_entries or {})
    pieces += _table_pieces({gd_sec * SECTOR + 4 * i: v for i, v in gd.items() if i < size}, "I")
    end = (gt_sec + 32 * len(tables)) * SECTOR
    entries: dict[int, int] = {}
    for g, data in grains.items():
        blob = data.ljust(granularity * SECTOR, b"\0")
        pieces.append((end, blob))
        entries[gd[g // 4096] * SECTOR + 4 * (g % 4096)] = end // SECTOR
        end += len(blob)
    pieces += _table_pieces(entries, "I")
    return Sparse(end, pieces)


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
    """A seSparse extent as bytes (see :func:`sesparse_layout`)."""
    return sesparse_layout(
        capacity,
        grains,
        replay_journal=replay_journal,
        version=version,
        gd_sectors=gd_sectors,
        gd_entries=gd_entries,
        first_cluster=first_cluster,
    ).to_bytes()


def sesparse_layout(
    capacity: int,
    grains: Mapping[int, bytes | int],
    *,
    replay_journal: int = 0,
    version: int = 0x0000000200000001,
    gd_sectors: int | None = None,
    gd_entries: Mapping[int, int] | None = None,
    first_cluster: int = 0,
) -> Sparse:
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
    number = {t: n for n, t in enumerate(tables)}
    n_data = sum(1 for v in grains.values() if isinstance(v, bytes))
    grains_off = gt_off + 64 * len(tables)
    fields = [0xCAFEBABE, version, capacity, 8, 64, 0, 0, 0, 0, 0]
    fields += [1, 1, 2, 1, 3, 5]  # volatile header, journal header, journal
    fields += [gd_off, dir_secs, gt_off, 64 * max(1, len(tables))]
    fields += [0, 0, 0, 0, grains_off, 8 * n_data]  # free bitmap, back map, grains
    pieces = [(0, struct.pack("<26Q", *fields).ljust(SECTOR, b"\0"))]
    volatile = struct.pack("<4Q", 0xCAFECAFE, len(tables), 1, replay_journal)
    pieces.append((SECTOR, volatile.ljust(SECTOR, b"\0")))
    gd = {t: 0x1000000000000000 | n for t, n in number.items()}
    gd.update(gd_entries or {})
    pieces += _table_pieces({gd_off * SECTOR + 8 * i: v for i, v in gd.items()}, "Q")
    end = (grains_off + 8 * first_cluster) * SECTOR
    cluster = first_cluster
    entries: dict[int, int] = {}
    for g, value in grains.items():
        if isinstance(value, bytes):
            blob = value.ljust(8 * SECTOR, b"\0")
            pieces.append((end, blob))
            end += len(blob)
            value = 0x3000000000000000 | ((cluster & 0xFFF) << 48) | (cluster >> 12)
            cluster += 1
        entries[(gt_off + 64 * number[g // 4096]) * SECTOR + 8 * (g % 4096)] = value
    pieces += _table_pieces(entries, "Q")
    return Sparse(end, pieces)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
