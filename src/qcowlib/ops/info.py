"""``info``: what qemu-img info reports, as the same JSON structure."""

from __future__ import annotations

import os
from typing import Any

from qcowlib.disk._file import HostFile
from qcowlib.disk.base import Disk
from qcowlib.disk.chain import BackingPolicy, open_disk


def _actual_size(disk: Disk) -> int | None:
    # qemu-img 7.2 counts the image file only (not a qcow2 external data file), but
    # all the files of a VMDK (descriptor and extents).
    from qcowlib.disk.vmdk import VmdkDisk

    if isinstance(disk, VmdkDisk):
        files = {h.identity: h for h in [disk.host, *disk.extent_hosts]}
        return sum(h.allocated for h in files.values())
    host = getattr(disk, "host", None)
    if isinstance(host, HostFile):
        return host.allocated
    return None


def full_backing_filename(filename: str, backing: str) -> str:
    """qemu's ``path_combine``: a relative backing name joined to the image's directory."""
    if os.path.isabs(backing):
        return backing
    directory = os.path.dirname(filename)
    return os.path.join(directory, backing) if directory else backing


def image_info(disk: Disk) -> dict[str, Any]:
    """qemu-img info's JSON object for one layer (keys and meaning as qemu-img 7.2)."""
    from qcowlib.disk.qcow2 import Qcow2Disk
    from qcowlib.disk.vdi import VdiDisk
    from qcowlib.disk.vhd import VhdDisk
    from qcowlib.disk.vhdx import VhdxDisk
    from qcowlib.disk.vmdk import VmdkDisk

    info: dict[str, Any] = {}
    if isinstance(disk, Qcow2Disk):
        h = disk.header
        snaps = disk.snapshots()
        if snaps:
            info["snapshots"] = [
                {
                    **({"icount": s.icount} if s.icount is not None else {}),
                    "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                    "name": s.name,
                    "date-sec": s.date_sec,
                    "date-nsec": s.date_nsec,
                    "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000,
                    "id": s.id_str,
                    "vm-state-size": s.vm_state_size,
                }
                for s in snaps
            ]
        if h.backing_format is not None and h.backing_file is not None:
            info["backing-filename-format"] = h.backing_format
    elif isinstance(disk, VmdkDisk) and disk.parent_file_name is not None:
        info["backing-filename-format"] = "vmdk"
    info["virtual-size"] = disk.virtual_size
    info["filename"] = disk.filename
    if isinstance(disk, Qcow2Disk):
        info["cluster-size"] = disk.cluster_size
    elif isinstance(disk, VdiDisk):
        info["cluster-size"] = disk.block_size
    elif isinstance(disk, (VhdxDisk, VhdDisk)) and disk.cluster_size is not None:
        info["cluster-size"] = disk.cluster_size
    elif isinstance(disk, VmdkDisk) and any(p.header is not None for p in disk.parts):
        info["cluster-size"] = next(p.header.grain_bytes for p in disk.parts if p.header)
    info["format"] = disk.format
    actual = _actual_size(disk)
    if actual is not None:
        info["actual-size"] = actual
    if isinstance(disk, Qcow2Disk):
        h = disk.header
        data: dict[str, Any] = {"compat": h.compat, "compression-type": h.compression_type_name}
        if h.version >= 3:
            data["lazy-refcounts"] = h.lazy_refcounts
            bitmaps = disk.bitmaps()
            if bitmaps:
                data["bitmaps"] = [
                    {"flags": b.flag_names, "name": b.name, "granularity": b.granularity}
                    for b in bitmaps
                ]
        data["refcount-bits"] = h.refcount_bits
        if h.has_data_file:
            data["data-file"] = h.data_file
            data["data-file-raw"] = h.data_file_raw
        if h.version >= 3:
            data["corrupt"] = h.corrupt
            data["extended-l2"] = h.extended_l2
        info["format-specific"] = {"type": "qcow2", "data": data}
        if h.backing_file is not None:
            info["full-backing-filename"] = full_backing_filename(disk.filename, h.backing_file)
            info["backing-filename"] = h.backing_file
        info["dirty-flag"] = h.dirty
    else:
        if isinstance(disk, VmdkDisk):
            info["format-specific"] = {"type": "vmdk", "data": _vmdk_data(disk)}
            parent = disk.parent_file_name
            if parent is not None:
                info["full-backing-filename"] = full_backing_filename(disk.filename, parent)
                info["backing-filename"] = parent
        info["dirty-flag"] = False
    return info


def _vmdk_data(disk: Any) -> dict[str, Any]:
    """qemu-img's format-specific data for VMDK (cid, parent-cid, create-type, extents)."""
    monolithic = len(disk.parts) == 1 and disk.parts[0].filename == disk.filename
    extents = []
    for part in disk.parts:
        ext: dict[str, Any] = {}
        header = part.header
        if header is not None and header.compressed:
            ext["compressed"] = True
        ext["virtual-size"] = part.length
        ext["filename"] = part.filename
        if header is not None:
            ext["cluster-size"] = header.grain_bytes
        ext["format"] = "" if monolithic else ("SPARSE" if header is not None else "FLAT")
        extents.append(ext)
    return {
        "cid": disk.cid,
        "parent-cid": disk.parent_cid,
        "create-type": disk.create_type,
        "extents": extents,
    }


def info(
    path: str, fmt: str | None = None, *, backing_chain: bool = False
) -> dict[str, Any] | list[dict[str, Any]]:
    """``qemu-img info`` for ``path``: one object, or a list top-first with the chain.

    Without ``backing_chain`` the backing file is not opened (as qemu-img info).
    """
    policy = BackingPolicy(follow=backing_chain)
    with open_disk(path, fmt, policy) as disk:
        if not backing_chain:
            return image_info(disk)
        return [image_info(d) for d in disk.chain]
