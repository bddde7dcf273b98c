"""Writing a new VMDK image from a source disk in one pass (``convert -O vmdk``).

monolithicSparse follows QEMU's ``vmdk_init_extent`` layout: header, embedded
descriptor (sector 1, 20 sectors), redundant grain directory and tables, grain
directory and tables, then 64 KiB grains from ``grain_offset`` (128 sectors) on.

streamOptimized follows VMware's layout (VDF 4): the header with ``gd_offset`` =
GD_AT_END and the compressed and markers flags, the embedded descriptor, then each
non-zero grain behind a grain marker (zlib data) in guest order, a GT marker and table
for every grain table with a grain, the GD marker and directory, the footer marker and
footer header (the real ``gd_offset``), and the end-of-stream marker.  Grains are read
and compressed by the reading workers of :class:`qcowlib.formats.qcow2.classify.Classifier`
(results in guest order) and each chunk's records are written in one call by a writer
thread.  All-zero grains are never written.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qcowlib.core.appendsink import AppendWriter
from qcowlib.core.disk import Disk
from qcowlib.core.hostfile import DataWriter, pwrite_all
from qcowlib.core.pipeline import TaskQueue
from qcowlib.core.runs import RunSource
from qcowlib.errors import InvalidArgument, QcowlibIOError
from qcowlib.formats.qcow2.classify import DATA, Chunk, Classifier, worth_compressing
from qcowlib.formats.vmdk import codec as vmdk

Progress = Callable[[int, int], None]
SUBFORMATS = ("monolithicSparse", "streamOptimized")
#: ``ddb.adapterType`` values QEMU and VMware accept (ESXi imports want ``lsilogic``).
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")
WORKERS = 2
SECTOR = vmdk.SECTOR


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
    heads = 16 if adapter_type == "ide" else 255  # as QEMU's geometry
    cyls = min(capacity // (heads * 63), 16383)
    desc = vmdk.build_descriptor(
        create_type=subformat,
        extents=[("RW", capacity, "SPARSE", extent_name, None)],
        cid=random.getrandbits(32) if cid is None else cid,
        ddb=[
            ("ddb.virtualHWVersion", hw_version),
            ("ddb.geometry.cylinders", str(cyls)),
            ("ddb.geometry.heads", str(heads)),
            ("ddb.geometry.sectors", "63"),
            ("ddb.adapterType", adapter_type),
        ],
    )
    if len(desc) > vmdk.DESC_SECTORS * SECTOR:
        raise InvalidArgument("VMDK descriptor does not fit 20 sectors")
    desc_end = vmdk.VMDK_DESC_SECTOR + vmdk.DESC_SECTORS
    if stream:
        rgd = gd = 0
        grain_offset = -(-desc_end // gs) * gs
    else:
        rgd = desc_end
        gd = rgd + gd_sectors + n_gt * gt_sectors
        grain_offset = -(-(gd + gd_sectors + n_gt * gt_sectors) // gs) * gs
    header = vmdk.SparseExtentHeader(
        version=3 if stream else 1,
        flags=vmdk.VMDK4_FLAG_NL_DETECT
        | (vmdk.VMDK4_FLAG_COMPRESS | vmdk.VMDK4_FLAG_MARKER if stream else vmdk.VMDK4_FLAG_RGD),
        capacity=capacity,
        grain_size=gs,
        desc_offset=vmdk.VMDK_DESC_SECTOR,
        desc_size=vmdk.DESC_SECTORS,
        num_gtes_per_gt=gtes,
        rgd_offset=rgd,
        gd_offset=vmdk.GD_AT_END if stream else gd,
        grain_offset=grain_offset,
        compress_algorithm=vmdk.COMPRESSION_DEFLATE if stream else vmdk.COMPRESSION_NONE,
    )
    head = vmdk.build_header(header) + desc.ljust(vmdk.DESC_SECTORS * SECTOR, b"\0")
    return VmdkPlan(
        stream, header, head, gs, gtes, n_grains, n_gt, gd_sectors, gt_sectors, rgd, gd,
        grain_offset,
    )  # fmt: skip


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


def grain_record_size(payload_len: int) -> int:
    """Bytes a compressed grain takes in a stream: marker head and payload, in sectors."""
    return -(-(vmdk.GRAIN_MARKER_HEAD_SIZE + payload_len) // SECTOR) * SECTOR


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
    plan = plan_vmdk(
        src.virtual_size,
        subformat=subformat,
        extent_name=extent_name,
        adapter_type=adapter_type,
        hw_version=hw_version,
    )
    stream = plan.stream
    gs, gb = plan.grain_size, plan.grain_bytes
    gte = np.zeros(plan.n_gt * plan.gtes, dtype=np.uint32)
    pos = plan.grain_offset * SECTOR
    size = src.virtual_size
    sink = DataWriter(fd)
    try:
        with TaskQueue(WORKERS, 2 * WORKERS, name="qcowlib-write") as tasks:
            # Stream records are staged into aligned buffers; sparse grains are written
            # from the chunk's buffer.
            out = AppendWriter(sink, tasks, pos) if stream else None
            for batch in grain_batches(src, gb, plan.n_grains, stream):
                records = batch.records(gs)
                lengths = np.fromiter(map(len, records), dtype=np.int64, count=len(records))
                starts = pos + np.concatenate(([0], np.cumsum(lengths)[:-1]))
                gte[batch.index] = (starts // SECTOR).astype(np.uint32)
                if out is not None:
                    for record in records:
                        out.append(record)
                    batch.release()
                else:
                    tasks.submit(_writer(sink, pos, records), batch.release)
                pos += int(lengths.sum())
                if progress and batch.index.size:
                    progress(min(size, (int(batch.index[-1]) + 1) * gb), size)
            if out is not None:
                out.close()
            tasks.join()
    finally:
        sink.close()
    if stream:
        trailer = stream_trailer(plan, gte, pos)
        _pwrite(fd, trailer, pos)
        pos += len(trailer)
    else:
        _pwrite(fd, sparse_tables(plan, gte), plan.rgd * SECTOR)
        pos = max(pos, plan.grain_offset * SECTOR)
    _pwrite(fd, plan.head, 0)
    try:
        os.ftruncate(fd, pos)
    except OSError as exc:
        raise QcowlibIOError(f"cannot size output: {exc.strerror}") from None
    if progress:
        progress(size, size)
    return pos


def _writer(sink: DataWriter, pos: int, records: list[bytes | memoryview]) -> Callable[[], None]:
    def write() -> None:
        if records:
            sink.write(pos, records)

    return write


def candidate_grains(src: Disk, gb: int) -> list[tuple[int, int]]:
    """Grain ranges ``[first, end)`` of ``src`` that may hold non-zero data."""
    first, end = RunSource(src).nonzero_units(gb)
    return list(zip(first.tolist(), end.tolist(), strict=True))


def stream_payload(grain: memoryview) -> bytes:
    """A grain's zlib stream for a streamOptimized extent (whose grains are always
    compressed): stored blocks where deflating would not shrink it (see
    :func:`qcowlib.formats.qcow2.classify.worth_compressing`), about the size deflate gives
    such data, for a fraction of its cost."""
    if worth_compressing(grain):
        return vmdk.compress_grain(grain)
    return vmdk.compress_grain(grain, 0)


@dataclass
class GrainBatch:
    """The non-zero grains of one chunk, in guest order."""

    index: npt.NDArray[np.int64]
    #: Compressed payloads (streamOptimized) or views of the grains' bytes.
    payloads: list[bytes | memoryview]
    release: Callable[[], None]

    def records(self, gs: int) -> list[bytes | memoryview]:
        """What the grains take in the file: marker and payload (padded to whole
        sectors) in a stream, the grain itself in a sparse extent."""
        if self.payloads and isinstance(self.payloads[0], memoryview):
            return self.payloads
        return [
            vmdk.build_grain_marker(g * gs, bytes(p))
            for g, p in zip(self.index.tolist(), self.payloads, strict=True)
        ]


def grain_batches(
    src: Disk,
    gb: int,
    n_grains: int,
    compress: bool,
    ranges: list[tuple[int, int]] | None = None,
) -> Iterator[GrainBatch]:
    """Non-zero grains chunk by chunk in guest order, compressed when asked (each
    batch's ``release`` gives its buffer back once its views are no longer needed).

    ``ranges`` are the grain ranges to look at (default: :func:`candidate_grains`).
    """
    if ranges is None:
        ranges = candidate_grains(src, gb)
    ranges = [(a, min(b, n_grains)) for a, b in ranges if a < n_grains]
    clf = Classifier(src, src.virtual_size, gb, compressor=stream_payload if compress else None)
    for chunk in clf.chunks(ranges):
        local = np.flatnonzero(chunk.kinds == DATA)
        if compress:
            payloads: list[bytes | memoryview] = [
                p for p in (chunk.compressed[i] for i in local.tolist()) if p is not None
            ]
        else:
            payloads = [chunk.data[i * gb : (i + 1) * gb] for i in local.tolist()]

        yield GrainBatch(local.astype(np.int64) + chunk.first, payloads, _releaser(clf, chunk))


def _releaser(clf: Classifier, chunk: Chunk) -> Callable[[], None]:
    def release() -> None:
        clf.release(chunk)

    return release


def grains(
    src: Disk,
    gb: int,
    n_grains: int,
    compress: bool,
    ranges: list[tuple[int, int]] | None = None,
) -> Iterator[tuple[int, bytes]]:
    """Non-zero grains ``(index, bytes)`` in guest order, compressed when asked.

    ``ranges`` are the grain ranges to look at (default: :func:`candidate_grains`).
    """
    for batch in grain_batches(src, gb, n_grains, compress, ranges):
        try:
            for g, p in zip(batch.index.tolist(), batch.payloads, strict=True):
                yield g, bytes(p)
        finally:
            batch.release()


def _pwrite(fd: int, data: memoryview | bytes, offset: int) -> None:
    try:
        pwrite_all(fd, data, offset)
    except OSError as exc:
        raise QcowlibIOError(f"write error: {exc.strerror}", offset=offset) from None
