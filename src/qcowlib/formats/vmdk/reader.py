"""VMware VMDK images, read-only: monolithicSparse, streamOptimized, monolithicFlat,
twoGbMaxExtentSparse, twoGbMaxExtentFlat and ESXi's vmfs, vmfsSparse (COWD) and seSparse
disks, delta disks included; the createTypes and extent lines QEMU 7.2 opens.

A VMDK is a list of extents laid end to end in the guest.  A hosted sparse extent's
grain directory and grain tables are read and checked once on open
(:mod:`qcowlib.formats.vmdk.hosted`); an ESX one's (COWD, seSparse) are read a bounded
window at a time (:mod:`qcowlib.formats.vmdk.grainmap`), so that snapshot deltas of any
size map in bounded memory.  Both are turned into runs with numpy
(:mod:`qcowlib.formats.vmdk.mapping`): consecutive grains that are all unallocated, all
zeroed, or uncompressed at consecutive sectors form one run; a compressed grain is a
run of its own.  Extent files named by a descriptor are
untrusted paths: they are resolved relative to the descriptor with the caller's
:class:`~qcowlib.core.chain.BackingPolicy` (:func:`~qcowlib.core.chain.resolve_linked_path`)
and opened read-only.  A delta disk names its parent in ``parentFileNameHint``; the chain
(:mod:`qcowlib.core.chain`) opens it as the backing file, with the same policy as a qcow2
backing file, and unallocated grains read through it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import numpy.typing as npt

from qcowlib.core.disk import Disk, Extent, ExtentKind, Runs, full_backing_filename
from qcowlib.core.hostfile import HostFile
from qcowlib.errors import (
    BackingMismatch,
    CorruptImage,
    FormatError,
    QcowlibError,
    TruncatedImage,
)
from qcowlib.formats.vmdk import codec as vmdk
from qcowlib.formats.vmdk import mapping
from qcowlib.formats.vmdk.grainmap import GrainMap, WholeMap
from qcowlib.formats.vmdk.hosted import read_runs
from qcowlib.formats.vmdk.reader_esx import open_cowd, open_sesparse

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
SECTOR = vmdk.SECTOR

#: Run kinds of a sparse extent (:mod:`qcowlib.formats.vmdk.mapping`'s numbers).
_UNALLOC, _ZERO, _DATA = mapping.RUN_UNALLOC, mapping.RUN_ZERO, mapping.RUN_DATA
_COMPRESSED, _ERROR = mapping.RUN_COMPRESSED, mapping.RUN_ERROR
#: createType values read from a stand-alone descriptor (QEMU's list).
DESCRIPTOR_TYPES = vmdk.DESCRIPTOR_TYPES
#: A compressed grain may take a little more than the grain (incompressible data).
_COMPRESSED_SLACK = 4096


@dataclass
class _Part:
    """One extent of the disk: guest ``[start, start + length)`` in ``host``."""

    start: int
    length: int
    kind: str  # "flat" or "sparse" (any grain-mapped extent: KDMV, COWD, seSparse)
    host: HostFile | None
    filename: str
    flat_offset: int = 0
    header: vmdk.SparseExtentHeader | None = None
    #: QEMU's extent type for info ("" for a disk that is its own only extent).
    etype: str = ""
    #: Sparse extents: sectors per grain and grains in the extent.
    grain_size: int = 0
    num_grains: int = 0
    #: Sparse extents: their grains as runs (``None``: a capacity of 0).
    grains: GrainMap | None = None

    @property
    def end(self) -> int:
        return self.start + self.length


def open_vmdk(host: HostFile, path: str, policy: BackingPolicy | None = None) -> Disk:
    """Open the VMDK whose first file is ``host`` (named ``path``); see :class:`VmdkDisk`."""
    return VmdkDisk(host, path, policy)


def open_image(host: HostFile, path: str, policy: BackingPolicy) -> Disk:
    """The registry's opener (a delta disk's parent is the chain's to open)."""
    return VmdkDisk(host, path, policy)


class VmdkDisk(Disk):
    """A VMDK image opened read-only.

    Raises :class:`FormatError` subclasses for bad headers, tables, markers and
    descriptors, :class:`UnsupportedFeature` for what QEMU refuses too, and
    :class:`~qcowlib.errors.UnsafeBackingPath` / :class:`~qcowlib.errors.QcowlibIOError`
    for extent files the policy refuses or that cannot be opened.
    """

    format = "vmdk"
    #: Opened for ``check``: grains past the end of their file are kept for the check to
    #: report (as QEMU opens images for ``qemu-img check``) instead of refused.
    checking = False

    def __init__(self, host: HostFile, filename: str, policy: BackingPolicy | None = None) -> None:
        from qcowlib.core.chain import BackingPolicy

        self.host = host
        self.filename = filename
        self.policy = policy or BackingPolicy()
        self.parts: list[_Part] = []
        self._hosts: list[HostFile] = []
        self._cache: tuple[tuple[int, int], bytes] | None = None
        try:
            self._open()
        except QcowlibError as exc:
            self._close_extents()
            raise exc.with_file(filename) from None
        except BaseException:
            self._close_extents()
            raise
        self._starts = np.array([p.start for p in self.parts] or [0], dtype=np.int64)
        self.virtual_size = sum(p.length for p in self.parts)

    # -- links and info ------------------------------------------------------------------
    @property
    def backing_file_name(self) -> str | None:
        return self.parent_file_name

    @property
    def backing_file_format(self) -> str | None:
        # A VMDK's parent is always a VMDK (QEMU creates nothing else): opened as one.
        return "vmdk" if self.parent_file_name is not None else None

    def check_parent(self, parent: Disk) -> None:
        """A delta disk reads only over the parent it was made from (QEMU refuses too)."""
        want = self.parent_cid
        have = parent.cid if isinstance(parent, VmdkDisk) else None
        if want != have:
            shown = "none" if have is None else f"{have:08x}"
            raise BackingMismatch(
                f"parent {parent.filename!r} has CID {shown} but this delta disk was made "
                f"over CID {'none' if want is None else f'{want:08x}'}: the parent changed "
                "after the delta disk was created, so the chain would read wrong data",
                file=self.filename,
                structure="vmdk descriptor",
                field="parentCID",
            )

    def info_head(self) -> dict[str, Any]:
        return {"backing-filename-format": "vmdk"} if self.parent_file_name is not None else {}

    def _uniform(self) -> bool:
        """QEMU's ``vmdk_get_info`` succeeds: every extent is of the first one's kind
        (else qemu-img info shows neither cluster-size nor dirty-flag)."""

        def kind(p: _Part) -> tuple[bool, bool, int]:
            flat = p.kind == "flat"
            compressed = p.header is not None and p.header.compressed
            return flat, compressed, 0 if flat else p.grain_size

        return bool(self.parts) and all(kind(p) == kind(self.parts[0]) for p in self.parts)

    @property
    def info_cluster_size(self) -> int | None:
        if not self._uniform() or self.parts[0].kind == "flat":
            return None
        return self.parts[0].grain_size * SECTOR

    def info_tail(self) -> dict[str, Any]:
        info: dict[str, Any] = {"format-specific": {"type": "vmdk", "data": self._info_data()}}
        parent = self.parent_file_name
        if parent is not None:
            info["full-backing-filename"] = full_backing_filename(self.filename, parent)
            info["backing-filename"] = parent
        if self._uniform():
            info["dirty-flag"] = False
        return info

    def _info_data(self) -> dict[str, Any]:
        """qemu-img's format-specific data (cid, parent-cid, create-type, extents)."""
        extents = []
        for part in self.parts:
            ext: dict[str, Any] = {}
            header = part.header
            if header is not None and header.compressed:
                ext["compressed"] = True
            ext["virtual-size"] = part.length
            ext["filename"] = part.filename
            if part.kind != "flat":
                ext["cluster-size"] = part.grain_size * SECTOR
            ext["format"] = part.etype
            extents.append(ext)
        return {
            "cid": self.cid,
            "parent-cid": self.parent_cid,
            "create-type": self.create_type,
            "extents": extents,
        }

    def actual_size(self) -> int | None:
        # qemu-img 7.2 counts the descriptor's file and each extent's (a file two
        # extents name counts twice).
        return self.host.allocated + sum(h.allocated for h in self.extent_hosts)

    # -- opening -------------------------------------------------------------------------
    def _open(self) -> None:
        host = self.host
        if host.size < 4:
            raise TruncatedImage("file is too small to be a VMDK image", structure="vmdk header")
        magic = host.pread(0, 4)
        if magic == vmdk.VMDK3_MAGIC:
            self._open_cowd_disk()
            return
        if magic == vmdk.VMDK4_MAGIC:
            header = self._read_header(host)
            if header.capacity == 0 and header.desc_offset:
                # A descriptor-only sparse file (QEMU accepts it): read it as a descriptor.
                off, length = header.descriptor_range
                self._open_descriptor(host.pread(off, min(length, host.size - off)))
                return
            desc = vmdk.VmdkDescriptor((), (), (), ())
            if header.desc_offset:
                off, length = header.descriptor_range
                desc = vmdk.parse_descriptor(host.pread(off, min(length, host.size - off)))
            self.descriptor = desc
            self.create_type = "streamOptimized" if header.compressed else "monolithicSparse"
            self.parts.append(self._sparse_part(host, self.filename, 0, header))
            return
        self._open_descriptor(host.pread(0, min(host.size, vmdk.VMDK_DESC_MAX)))

    def _read_header(self, host: HostFile) -> vmdk.SparseExtentHeader:
        head = host.pread(0, min(host.size, SECTOR))
        header = vmdk.parse_header(head, host.size)
        if header.gd_offset == vmdk.GD_AT_END:
            tail_at = max(0, host.size - 3 * SECTOR)
            tail = host.pread(tail_at, min(host.size, 3 * SECTOR))
            footer = vmdk.stream_footer_header(tail, host.size)
            header = footer
        return header

    @property
    def parent_file_name(self) -> str | None:
        """The parent (backing) file a delta disk names, as written (``parentFileNameHint``).

        As in QEMU, a ``parentCID`` without a hint names no parent: the disk reads alone.
        """
        return self.descriptor.parent_file_name_hint

    def _open_descriptor(self, raw: bytes) -> None:
        from qcowlib.core.chain import open_linked, resolve_linked_path

        try:
            desc = vmdk.parse_descriptor(raw)
        except FormatError:
            raise FormatError(
                "not a VMDK image (no descriptor)", structure="vmdk descriptor"
            ) from None
        vmdk.check_descriptor(desc)
        self.descriptor = desc
        self.create_type = desc.create_type or ""
        pos = 0
        for ext in desc.read_extents:
            where = f"extent line {ext.line}"
            assert ext.sectors is not None and ext.filename is not None  # qemu_extents
            if ext.sectors > vmdk.VMDK_CAPACITY_MAX - pos // SECTOR:
                raise CorruptImage(f"{where}: disk too large", structure="vmdk descriptor")
            full = resolve_linked_path(self.filename, ext.filename, "VMDK extent", self.policy)
            if full == self.filename:
                raise CorruptImage(f"{where} names the descriptor itself")
            # Regular files only, as the policy allows, with qemu's shared read locks.
            ehost, full = open_linked(self.filename, ext.filename, "VMDK extent", self.policy)
            self._hosts.append(ehost)
            try:
                part = self._extent_part(ext, ehost, full, pos)
            except QcowlibError as exc:
                raise exc.with_file(full) from None
            self.parts.append(part)
            pos += part.length

    def _extent_part(self, ext: vmdk.VmdkExtent, ehost: HostFile, full: str, pos: int) -> _Part:
        """One extent QEMU's ``vmdk_parse_extents`` opens, by its type."""
        assert ext.sectors is not None
        if ext.type in vmdk.FLAT_TYPES:
            assert ext.offset is not None  # qemu_extents
            return _Part(
                pos,
                ext.sectors * SECTOR,
                "flat",
                ehost,
                full,
                flat_offset=ext.offset * SECTOR,
                etype=ext.type,
            )
        if ext.type == "SESPARSE":
            h, found = open_sesparse(ehost, full, strict=not self.checking)
            return self._mapped_part(ehost, full, pos, ext.type, h.capacity, found)
        # SPARSE and VMFSSPARSE: a hosted sparse (KDMV) or a COWD extent, by magic.
        if ehost.size < 4:
            raise FormatError("File is too small, not a valid image", file=full)
        magic = ehost.pread(0, 4)
        if magic == vmdk.VMDK3_MAGIC:
            ch, cowd_map = open_cowd(ehost, full, strict=not self.checking)
            return self._mapped_part(ehost, full, pos, ext.type, ch.capacity, cowd_map)
        if magic != vmdk.VMDK4_MAGIC:
            raise FormatError("Image not in VMDK format (not a sparse extent)", file=full)
        part = self._sparse_part(ehost, full, pos, self._read_header(ehost))
        part.etype = ext.type
        return part

    def _mapped_part(
        self, host: HostFile, filename: str, pos: int, etype: str, capacity: int, m: GrainMap
    ) -> _Part:
        """A COWD or seSparse extent's part (its header is checked and done with)."""
        part = _Part(pos, capacity * SECTOR, "sparse", host, filename, etype=etype)
        part.grain_size, part.num_grains, part.grains = m.grain_size, m.n_grains, m
        return part

    def _open_cowd_disk(self) -> None:
        """A COWD file opened as the disk, as QEMU does: its CID, parent and the rest of
        the descriptor come from the text at 0x200 (20 sectors), which QEMU requires to
        hold a ``CID``."""
        at, size = 0x200, 20 * SECTOR
        text = self.host.pread(at, min(size, max(0, self.host.size - at)))
        try:
            desc = vmdk.parse_descriptor(text)
        except QcowlibError:
            desc = vmdk.VmdkDescriptor((), (), (), ())
        if desc.cid is None:
            raise CorruptImage(
                "a COWD file opened as the disk needs descriptor text with a CID at 0x200 "
                "(qemu-img refuses it too: Invalid argument)",
                structure="vmdk descriptor",
                field="CID",
                offset=at,
            )
        self.descriptor = desc
        self.create_type = ""
        h, found = open_cowd(self.host, self.filename, strict=not self.checking)
        self.parts.append(self._mapped_part(self.host, self.filename, 0, "", h.capacity, found))

    def _sparse_part(
        self, host: HostFile, filename: str, pos: int, h: vmdk.SparseExtentHeader
    ) -> _Part:
        length = h.capacity * SECTOR
        part = _Part(pos, length, "sparse", host, filename, header=h)
        part.grain_size, part.num_grains = h.grain_size, h.num_grains
        if h.capacity == 0:
            return part
        try:
            part.grains = WholeMap(read_runs(host, h, strict=not self.checking), h.grain_size)
        except QcowlibError as exc:
            raise exc.with_file(filename) from None
        return part

    # -- mapping ------------------------------------------------------------------------
    @property
    def subformat(self) -> str:
        return self.create_type

    @property
    def extent_hosts(self) -> list[HostFile]:
        """The extent files this image opened (besides the descriptor's own file)."""
        return list(self._hosts)

    @property
    def cid(self) -> int | None:
        return self.descriptor.cid

    @property
    def parent_cid(self) -> int | None:
        return self.descriptor.parent_cid

    def _part_at(self, pos: int) -> int:
        return int(np.searchsorted(self._starts, pos, side="right")) - 1

    def layer_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        start, end = self._range(offset, length)
        i = self._part_at(start)
        pos = start
        while pos < end:
            part = self.parts[i]
            stop = min(end, part.end)
            if part.kind == "flat":
                # As qemu-img map: holes in a flat extent file are "data" and "zero".
                assert part.host is not None
                host = part.flat_offset + pos - part.start
                for s, e, is_data in part.host.segments(host, host + stop - pos):
                    yield Extent(
                        pos + s - host,
                        e - s,
                        ExtentKind.DATA,
                        host_offset=s,
                        file=part.filename,
                        hole=not is_data,
                    )
            else:
                yield from self._sparse_extents(part, pos, stop)
            pos = stop
            i += 1

    def _sparse_extents(self, part: _Part, start: int, end: int) -> Iterator[Extent]:
        """The extents of a sparse part over guest ``[start, end)``, a window of its
        grain map at a time."""
        grains = part.grains
        gb = part.grain_size * SECTOR
        pos, rel_end = start - part.start, end - part.start
        while grains is not None and pos < rel_end:
            window = grains.runs(pos // gb, -(-rel_end // gb))
            stop = min(rel_end, window.end * gb)
            yield from self._window_extents(part, window, pos, stop)
            pos = stop

    def _window_extents(
        self, part: _Part, w: mapping.GrainRuns, pos: int, rel_end: int
    ) -> Iterator[Extent]:
        """The extents of part-relative ``[pos, rel_end)``, inside window ``w``."""
        gb = part.grain_size * SECTOR
        j = int(np.searchsorted(w.start, pos // gb, side="right")) - 1
        k = int(np.searchsorted(w.start, -(-rel_end // gb)))
        rows = zip(
            w.start[j:k].tolist(),
            w.length[j:k].tolist(),
            w.kind[j:k].tolist(),
            w.sector[j:k].tolist(),
            strict=True,
        )
        for first, count, kind, sector in rows:
            r0 = first * gb
            lo, hi = max(pos, r0), min(rel_end, (first + count) * gb)
            g = part.start + lo
            if kind == _ERROR:
                self._window_error(part, g)
            if kind == _UNALLOC:
                yield Extent(g, hi - lo, ExtentKind.UNALLOCATED)
            elif kind == _ZERO:
                yield Extent(g, hi - lo, ExtentKind.ZERO)
            elif kind == _DATA:
                host = sector * SECTOR + (lo - r0)
                yield Extent(g, hi - lo, ExtentKind.DATA, host_offset=host, file=part.filename)
            else:
                host = sector * SECTOR
                yield Extent(
                    g, hi - lo, ExtentKind.COMPRESSED, host_offset=host, file=part.filename
                )

    def layer_runs(self, offset: int, end: int) -> Runs:
        """:meth:`layer_extents` as arrays: a grain map window (or a flat extent's data
        and holes) at a time, clipped with array operations."""
        from qcowlib.core.layerruns import empty_runs, layer_runs

        start, end = self._range(offset, end - offset)
        files = (None, *(p.filename for p in self.parts))
        pieces: list[tuple[I64, I64, U8, I64, npt.NDArray[np.bool_], int]] = []
        i, pos = self._part_at(start), start
        while pos < end:
            part, stop = self.parts[i], min(end, self.parts[i].end)
            if part.kind == "flat":
                pieces.append((*self._flat_runs(part, pos, stop), i + 1))
            else:
                pieces.extend((*p, i + 1) for p in self._sparse_runs(part, pos, stop))
            pos, i = stop, i + 1
        if not pieces:
            return empty_runs(files)
        s, n, k, h, hole = (np.concatenate([p[c] for p in pieces]) for c in range(5))
        f = np.concatenate([np.where(p[3] >= 0, p[5], 0) for p in pieces])
        return layer_runs(s, n, k, h, f, files, hole)

    def _flat_runs(self, part: _Part, pos: int, stop: int) -> tuple[I64, I64, U8, I64, Any]:
        """A flat extent's guest ``[pos, stop)``: data, holes in the file marked."""
        from qcowlib.core.layerruns import split_by_holes

        assert part.host is not None
        one = np.array([pos], dtype=np.int64)
        at = one - part.start + part.flat_offset
        length = np.array([stop - pos], dtype=np.int64)
        _, s, n, h, is_data = split_by_holes(part.host, one, length, at)
        return s, n, np.full(s.size, _DATA, dtype=np.uint8), h, ~is_data

    def _sparse_runs(
        self, part: _Part, start: int, end: int
    ) -> Iterator[tuple[I64, I64, U8, I64, Any]]:
        """A sparse extent's runs over guest ``[start, end)``, a window of its grain map
        at a time (the windows :meth:`_sparse_extents` reads, errors at the same grains)."""
        grains = part.grains
        gb = part.grain_size * SECTOR
        pos, rel_end = start - part.start, end - part.start
        while grains is not None and pos < rel_end:
            window = grains.runs(pos // gb, -(-rel_end // gb))
            stop = min(rel_end, window.end * gb)
            lo, length, kind, host = mapping.clip_runs(window, gb, pos, stop)
            bad = np.flatnonzero(kind == _ERROR)
            if bad.size:
                self._window_error(part, part.start + int(lo[int(bad[0])]))
            yield lo + part.start, length, kind, host, np.zeros(lo.size, dtype=np.bool_)
            pos = stop

    def runs_data_file(self) -> HostFile | None:
        hosts = {id(p.host) for p in self.parts}
        return self.parts[0].host if len(hosts) == 1 else None

    @staticmethod
    def _window_error(part: _Part, g: int) -> NoReturn:
        raise CorruptImage(
            f"no valid grain directory or grain table entry maps guest offset {g} "
            "(qemu-img reads it as an I/O error)",
            file=part.filename,
            structure="vmdk grain directory",
        )

    # -- reads --------------------------------------------------------------------------
    def _read_layer(self, ext: Extent, buf: memoryview) -> None:
        part = self.parts[self._part_at(ext.start)]
        assert part.host is not None and ext.host_offset is not None
        if ext.kind is ExtentKind.DATA:
            part.host.pread_into(ext.host_offset, buf)
            return
        h = part.header
        assert h is not None
        gb = h.grain_bytes
        grain = (ext.start - part.start) // gb
        data = self._grain(part, grain, ext.host_offset)
        at = ext.start - part.start - grain * gb
        buf[:] = data[at : at + len(buf)]

    def _grain(self, part: _Part, grain: int, marker_at: int) -> bytes:
        key = (id(part), marker_at)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        h = part.header
        assert h is not None and part.host is not None
        gb = h.grain_bytes
        lba, size = vmdk.parse_grain_marker(
            part.host.pread_exact(marker_at, vmdk.GRAIN_MARKER_HEAD_SIZE, "vmdk grain marker"),
            marker_at,
        )
        if lba != grain * h.grain_size:
            raise CorruptImage(
                f"grain marker names sector {lba}, not {grain * h.grain_size}",
                file=part.filename,
                structure="vmdk grain marker",
                field="lba",
                offset=marker_at,
            )
        if size == 0 or size > gb + _COMPRESSED_SLACK:
            raise CorruptImage(
                f"compressed grain size {size} is invalid",
                file=part.filename,
                structure="vmdk grain marker",
                field="size",
                offset=marker_at,
            )
        payload = part.host.pread_exact(
            marker_at + vmdk.GRAIN_MARKER_HEAD_SIZE, size, "vmdk compressed grain"
        )
        try:
            data = vmdk.decompress_grain(payload, gb, offset=marker_at)
        except QcowlibError as exc:
            raise exc.with_file(part.filename) from None
        self._cache = (key, data)
        return data

    def host_file_for(self, ext: Extent) -> HostFile | None:
        return self.parts[self._part_at(ext.start)].host

    def _close_extents(self) -> None:
        for h in self._hosts:
            h.close()
        self._hosts = []

    def _close_layer(self) -> None:
        self._close_extents()
        self.host.close()
