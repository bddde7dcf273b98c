"""After the bytes went out: does Glance's record agree with what was sent (status, size,
md5 and sha512, store), and the contract's summary of the image."""

from __future__ import annotations

from typing import Any

from qcowlib.glance.request import UploadResult

__all__ = ["disagreements", "summary"]


def summary(record: Any, sent: int, digests: dict[str, str]) -> UploadResult:
    """The contract's keys as Glance reports them, then ours beside them."""
    props = record.properties or {}
    stores = [s for s in str(props.get("stores") or "").split(",") if s]
    return {
        "id": record.id,
        "name": record.name,
        "status": record.status,
        "disk_format": record.disk_format,
        "size": record.size,
        "virtual_size": record.virtual_size,
        "checksum": record.checksum,
        "os_hash_algo": record.hash_algo,
        "os_hash_value": record.hash_value,
        "container_format": record.container_format,
        "visibility": record.visibility,
        "protected": bool(record.is_protected),
        "tags": sorted(record.tags or []),
        "stores": stores,
        "computed": {"size": sent, "md5": digests["md5"], "sha512": digests["sha512"]},
    }


def disagreements(
    record: Any, sent: int, size: int, digests: dict[str, str], store: str | None
) -> list[str]:
    """What in Glance's record differs from what was sent ([] when all agree)."""
    problems = []
    if record.status != "active":
        problems.append(f"image status is {record.status!r}, not 'active'")
    if sent != size:
        problems.append(f"sent {sent} bytes, announced {size}")
    if record.size is not None and record.size != size:
        problems.append(f"Glance stored {record.size} bytes, we sent {size}")
    if record.checksum != digests["md5"]:
        problems.append(f"checksum {record.checksum} differs from ours {digests['md5']}")
    algo = record.hash_algo or "sha512"
    if algo == "sha512" and record.hash_value != digests["sha512"]:
        problems.append("os_hash_value differs from our sha512")
    elif algo != "sha512":
        problems.append(f"Glance hashes with {algo}; cannot verify os_hash_value")
    stores = str((record.properties or {}).get("stores") or "").split(",")
    if store is not None and store not in stores:
        problems.append(f"Glance stored the image in {','.join(stores)!r}, not in {store!r}")
    return problems
