"""The one writer of new VMDK images (``convert -O vmdk``, ``flatten``, its stream).

monolithicSparse follows QEMU's ``vmdk_init_extent`` layout: header, embedded
descriptor (sector 1, 20 sectors), redundant grain directory and tables, grain
directory and tables, then 64 KiB grains from ``grain_offset`` (128 sectors) on.

streamOptimized follows VMware's layout (VDF 4): the header with ``gd_offset`` =
GD_AT_END and the compressed and markers flags, the embedded descriptor, then each
non-zero grain behind a grain marker (zlib data) in guest order, a GT marker and table
for every grain table with a grain, the GD marker and directory, the footer marker and
footer header (the real ``gd_offset``), and the end-of-stream marker.  Grains are read
and compressed by the reading workers of :class:`qcowlib.core.plan.Classifier` (results
in guest order); :class:`VmdkLayout` places them and :mod:`qcowlib.core.emit` writes the
records to a file or a stream.  All-zero grains are never written.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qcowlib.core.disk import Disk
from qcowlib.core.emit import Record, write_file
from qcowlib.core.plan import (
    DATA,
    Chunk,
    Classifier,
    candidate_units,
    data_runs,
    worth_compressing,
)
from qcowlib.core.zero import nonzero_runs
from qcowlib.errors import InvalidArgument
from qcowlib.formats.vmdk import codec as vmdk

Progress = Callable[[int, int], None]
SUBFORMATS = ("monolithicSparse", "streamOptimized")
#: ``ddb.adapterType`` values QEMU and VMware accept (ESXi imports want ``lsilogic``).
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")
SECTOR = vmdk.SECTOR
#: ``ddb.toolsVersion`` QEMU writes unless ``-o toolsversion`` is given.
TOOLS_VERSION = "2147483647"


@dataclass(frozen=True)
class VmdkPlan:
    """Geometry and metadata of a new single-extent sparse VMDK (all in sectors)."""

    stream: bool
    header: vmdk.SparseExtentHeader
    #: Header sector and embedded descriptor, up to the end of the descriptor area.
    head: bytes
    grain_size: int
    gtes: int
    n_grains: int
    n_gt: int
    gd_sectors: int
    gt_sectors: int
    rgd: int
    gd: int
    grain_offset: int

    @property
    def grain_bytes(self) -> int:
        return self.grain_size * SECTOR


def plan_vmdk(
    virtual_size: int,
    *,
    subformat: str = "monolithicSparse",
    extent_name: str = "image.vmdk",
    adapter_type: str = "ide",
    hw_version: str = "4",
    cid: int | None = None,
    zeroed_grain: bool = False,
    tools_version: str = TOOLS_VERSION,
    embed_descriptor: bool = True,
) -> VmdkPlan:
    """Lay out a new VMDK of ``virtual_size`` bytes (a fresh random CID unless given).

    monolithicSparse: header, descriptor, redundant directory and tables, directory and
    tables, grains from ``grain_offset`` on.  streamOptimized: header (directory at the
    end), descriptor, then grains with markers from ``grain_offset`` on.  Raises
    :class:`InvalidArgument` for an unknown subformat or adapter type.
    """
    if subformat not in SUBFORMATS:
        raise InvalidArgument(f"VMDK subformat {subformat!r} is not one of {SUBFORMATS}")
    if adapter_type not in ADAPTER_TYPES:
        raise InvalidArgument(f"VMDK adapter type {adapter_type!r} is not one of {ADAPTER_TYPES}")
    stream = subformat == "streamOptimized"
    capacity = -(-virtual_size // SECTOR)
    gs = vmdk.DEFAULT_GRAIN_SIZE
    gtes = vmdk.DEFAULT_NUM_GTES_PER_GT
    n_grains = -(-capacity // gs)
    n_gt = -(-n_grains // gtes)
    gd_sectors = -(-n_gt * 4 // SECTOR)
    gt_sectors = gtes * 4 // SECTOR
    desc = b""
    if embed_descriptor:  # else an extent of a split image: its descriptor is a file
        ddb = disk_database(capacity, adapter_type, hw_version, tools_version)
        desc = _embedded_descriptor(subformat, capacity, extent_name, cid, ddb)
    desc_end = vmdk.VMDK_DESC_SECTOR + vmdk.DESC_SECTORS
    if stream:
        rgd = gd = 0
        grain_offset = -(-desc_end // gs) * gs
    else:
        rgd = desc_end
        gd = rgd + gd_sectors + n_gt * gt_sectors
        grain_offset = -(-(gd + gd_sectors + n_gt * gt_sectors) // gs) * gs
    header = _sparse_header(stream, zeroed_grain, capacity, rgd, gd, grain_offset)
    head = vmdk.build_header(header) + desc.ljust(vmdk.DESC_SECTORS * SECTOR, b"\0")
    return VmdkPlan(
        stream, header, head, gs, gtes, n_grains, n_gt, gd_sectors, gt_sectors, rgd, gd,
        grain_offset,
    )  # fmt: skip


def _embedded_descriptor(
    subformat: str,
    capacity: int,
    extent_name: str,
    cid: int | None,
    ddb: list[tuple[str, str]],
) -> bytes:
    """The descriptor a one-extent VMDK embeds (a fresh random CID unless given)."""
    desc = vmdk.build_descriptor(
        create_type=subformat,
        extents=[("RW", capacity, "SPARSE", extent_name, None)],
        cid=random.getrandbits(32) if cid is None else cid,
        ddb=ddb,
    )
    if len(desc) > vmdk.DESC_SECTORS * SECTOR:
        raise InvalidArgument("VMDK descriptor does not fit 20 sectors")
    return desc


def _sparse_header(
    stream: bool, zeroed_grain: bool, capacity: int, rgd: int, gd: int, grain_offset: int
) -> vmdk.SparseExtentHeader:
    """The hosted sparse extent header: streamOptimized (compressed grains with markers,
    directory at the end) or monolithicSparse (redundant directory)."""
    flags = vmdk.VMDK4_FLAG_NL_DETECT | (vmdk.VMDK4_FLAG_ZERO_GRAIN if zeroed_grain else 0)
    flags |= vmdk.VMDK4_FLAG_COMPRESS | vmdk.VMDK4_FLAG_MARKER if stream else vmdk.VMDK4_FLAG_RGD
    return vmdk.SparseExtentHeader(
        version=3 if stream else 2 if zeroed_grain else 1,
        flags=flags,
        capacity=capacity,
        grain_size=vmdk.DEFAULT_GRAIN_SIZE,
        desc_offset=vmdk.VMDK_DESC_SECTOR,
        desc_size=vmdk.DESC_SECTORS,
        num_gtes_per_gt=vmdk.DEFAULT_NUM_GTES_PER_GT,
        rgd_offset=rgd,
        gd_offset=vmdk.GD_AT_END if stream else gd,
        grain_offset=grain_offset,
        compress_algorithm=vmdk.COMPRESSION_DEFLATE if stream else vmdk.COMPRESSION_NONE,
    )


def disk_database(
    capacity: int, adapter_type: str, hw_version: str, tools_version: str
) -> list[tuple[str, str]]:
    """A new image's ``ddb.`` entries as QEMU writes them (geometry from the capacity
    in sectors and the adapter type)."""
    heads = 16 if adapter_type == "ide" else 255  # as QEMU's geometry
    cyls = min(capacity // (heads * 63), 16383)
    return [
        ("ddb.virtualHWVersion", hw_version),
        ("ddb.geometry.cylinders", str(cyls)),
        ("ddb.geometry.heads", str(heads)),
        ("ddb.geometry.sectors", "63"),
        ("ddb.adapterType", adapter_type),
        ("ddb.toolsVersion", tools_version),
    ]


def sparse_tables(plan: VmdkPlan, gte: npt.NDArray[np.uint32]) -> bytes:
    """A monolithicSparse image's redundant and primary directories and tables, as the
    bytes from sector ``plan.rgd`` to the end of the primary tables."""
    out = []
    for dir_at in (plan.rgd, plan.gd):
        gt_at = dir_at + plan.gd_sectors
        entries = gt_at + np.arange(plan.n_gt, dtype=np.uint32) * plan.gt_sectors
        out.append(vmdk.encode_table(entries))
        out.append(vmdk.encode_table(gte))
    return b"".join(out)


def stream_trailer(plan: VmdkPlan, gte: npt.NDArray[np.uint32], pos: int) -> bytes:
    """A streamOptimized image's end from byte ``pos`` (after the last grain): a marker
    and table per grain table in use, the directory, the footer and end-of-stream."""
    gt_sectors, gtes = plan.gt_sectors, plan.gtes
    gd_entries = np.zeros(plan.gd_sectors * SECTOR // 4, dtype=np.uint32)
    out = []
    for t in range(plan.n_gt):
        table = gte[t * gtes : (t + 1) * gtes]
        if not table.any():
            continue
        out.append(vmdk.build_marker(vmdk.MARKER_GT, gt_sectors))
        gd_entries[t] = pos // SECTOR + 1
        out.append(vmdk.encode_table(table))
        pos += SECTOR + gt_sectors * SECTOR
    out.append(vmdk.build_marker(vmdk.MARKER_GD, plan.gd_sectors))
    gd_at = pos // SECTOR + 1
    out.append(vmdk.encode_table(gd_entries))
    footer = plan.header.replace(gd_offset=gd_at)
    out.append(vmdk.build_marker(vmdk.MARKER_FOOTER, 1))
    out.append(vmdk.build_header(footer))
    out.append(vmdk.build_marker(vmdk.MARKER_EOS, 0))
    return b"".join(out)


def stream_payload(grain: memoryview) -> bytes:
    """A grain's zlib stream for a streamOptimized extent (whose grains are always
    compressed): stored blocks where deflating would not shrink it (see
    :func:`qcowlib.core.plan.worth_compressing`), about the size deflate gives such
    data, for a fraction of its cost."""
    if worth_compressing(grain):
        return vmdk.compress_grain(grain)
    return vmdk.compress_grain(grain, 0)


class VmdkLayout:
    """A new single-extent sparse VMDK of ``src`` (see :func:`plan_vmdk` for the
    options; the CID is drawn once per layout, so its file and stream are the same)."""

    holes = 0

    def __init__(
        self,
        src: Disk,
        *,
        subformat: str = "monolithicSparse",
        extent_name: str = "image.vmdk",
        adapter_type: str = "ide",
        hw_version: str = "4",
        cid: int | None = None,
        zeroed_grain: bool = False,
        tools_version: str = TOOLS_VERSION,
        embed_descriptor: bool = True,
    ) -> None:
        self.src = src
        self.plan = plan = plan_vmdk(
            src.virtual_size,
            subformat=subformat,
            extent_name=extent_name,
            adapter_type=adapter_type,
            hw_version=hw_version,
            cid=cid,
            zeroed_grain=zeroed_grain,
            tools_version=tools_version,
            embed_descriptor=embed_descriptor,
        )
        self.virtual_size = src.virtual_size
        self.unit = plan.grain_bytes
        self.stage = plan.stream
        self.data_start = plan.grain_offset * SECTOR
        n = plan.n_grains
        self._ranges = [(a, min(b, n)) for a, b in candidate_units(src, self.unit) if a < n]
        self.begin(stream=False)

    def ranges(self) -> list[tuple[int, int]]:
        return self._ranges

    def reserved(self) -> int:
        return 0

    def classifier(self) -> Classifier:
        compressor = stream_payload if self.plan.stream else None
        return Classifier(self.src, self.virtual_size, self.unit, compressor=compressor)

    def begin(self, stream: bool) -> None:
        plan = self.plan
        self.gte = np.zeros(plan.n_gt * plan.gtes, dtype=np.uint32)
        self.pos = self.data_start
        self.trailer = b""

    def place(self, chunk: Chunk) -> list[Record]:
        gb, gs = self.unit, self.plan.grain_size
        out: list[Record] = []
        if self.plan.stream:
            for i in np.flatnonzero(chunk.kinds == DATA).tolist():
                payload = chunk.compressed[i]
                assert payload is not None
                grain = chunk.first + i
                record = vmdk.build_grain_marker(grain * gs, payload)
                self.gte[grain] = self.pos // SECTOR
                out.append((self.pos, record))
                self.pos += len(record)
            return out
        for s, e in data_runs(chunk.kinds):
            first = chunk.first + s
            sectors = self.pos // SECTOR + np.arange(e - s, dtype=np.uint32) * np.uint32(gs)
            self.gte[first : first + e - s] = sectors
            out.append((self.pos, chunk.data[s * gb : e * gb]))
            self.pos += (e - s) * gb
        return out

    def early(self) -> list[Record]:
        return []

    def finish(self) -> list[Record]:
        plan = self.plan
        if plan.stream:
            self.trailer = stream_trailer(plan, self.gte, self.pos)
            return [(0, plan.head), (self.pos, self.trailer)]
        # All-zero pages of the tables are not written (holes in a file, zeros in a
        # stream), as QEMU leaves a new image's empty grain tables.
        at, tables = plan.rgd * SECTOR, sparse_tables(plan, self.gte)
        out: list[Record] = [(0, plan.head)]
        out += [(at + a, tables[a:b]) for a, b in nonzero_runs(tables, 4096)]
        return out

    def size(self) -> int:
        return self.pos + len(self.trailer)


def write_vmdk(
    src: Disk,
    fd: int,
    *,
    subformat: str = "monolithicSparse",
    progress: Progress | None = None,
    extent_name: str = "image.vmdk",
    adapter_type: str = "ide",
    hw_version: str = "4",
) -> int:
    """Write ``src``'s guest bytes into ``fd`` (a new, empty file) as a VMDK image.

    ``extent_name`` is the file name the embedded descriptor gives the extent (QEMU
    writes the output's base name); ``adapter_type`` and ``hw_version`` go into the
    descriptor's disk database (``ddb.adapterType``, ``ddb.virtualHWVersion``).
    Returns the file size.  Raises :class:`InvalidArgument` for an unknown subformat or
    adapter type and :class:`QcowlibIOError` on write errors; read errors from ``src``
    propagate.
    """
    layout = VmdkLayout(
        src,
        subformat=subformat,
        extent_name=extent_name,
        adapter_type=adapter_type,
        hw_version=hw_version,
    )
    return write_file(layout, fd, progress=progress)
