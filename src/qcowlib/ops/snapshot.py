"""``snapshot``: list, create, apply and delete internal snapshots, as ``qemu-img snapshot``.

Listing is format-neutral (a format without internal snapshots lists none, as
qemu-img prints nothing for it); the changes go to the format's ``snapshot`` part in
the registry (qcow2's lives in :mod:`qcowlib.formats.qcow2.snapshot_rw`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, cast

from qcowlib._json import JSONObject
from qcowlib.core import interrupt
from qcowlib.core.chain import BackingPolicy
from qcowlib.errors import InvalidArgument, QcowlibError, UnsupportedFeature

__all__ = [
    "SnapshotInfo",
    "apply_snapshot",
    "create_snapshot",
    "delete_snapshot",
    "list_snapshots",
]


@dataclass(frozen=True)
class SnapshotInfo:
    """One internal snapshot as ``qemu-img snapshot -l`` and ``info`` show it."""

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int | None

    def as_json(self) -> JSONObject:
        """The entry of ``info --output json``'s ``snapshots`` list."""
        return {
            **({"icount": self.icount} if self.icount is not None else {}),
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
            "name": self.name,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "id": self.id,
            "vm-state-size": self.vm_state_size,
        }


def _format(path: str, fmt: str | None) -> str:
    from qcowlib.ops.modify import _format_of

    return _format_of(path, fmt)


def list_snapshots(path: str | os.PathLike[str], fmt: str | None = None) -> list[SnapshotInfo]:
    """The image's internal snapshots (its backing chain is not opened).

    Raises the usual open errors (:class:`~qcowlib.errors.QcowlibError` subclasses).
    """
    from qcowlib.formats.opener import open_disk

    path = os.fspath(path)
    with open_disk(path, fmt, BackingPolicy(follow=False, follow_data_file=False)) as disk:
        raw = cast("list[dict[str, Any]]", disk.info_head().get("snapshots", []))
    return [
        SnapshotInfo(
            id=s["id"],
            name=s["name"],
            vm_state_size=s["vm-state-size"],
            date_sec=s["date-sec"],
            date_nsec=s["date-nsec"],
            vm_clock_nsec=s["vm-clock-sec"] * 1_000_000_000 + s["vm-clock-nsec"],
            icount=s.get("icount"),
        )
        for s in raw
    ]


def _part(path: str, fmt: str | None, verb: str, name: str) -> Any:
    from qcowlib.formats import registry

    fmt = _format(path, fmt)
    try:
        return registry.by_name(fmt).implementation("snapshot")
    except UnsupportedFeature:
        raise UnsupportedFeature(
            f"Could not {verb} snapshot '{name}': Operation not supported "
            f"({fmt} images have no internal snapshots)",
            file=path,
        ) from None


def create_snapshot(path: str | os.PathLike[str], name: str, fmt: str | None = None) -> None:
    """``qemu-img snapshot -c NAME``: a new snapshot of the current disk state, with the
    next free numeric ID and the current time (vm-clock and icount 0, as qemu-img)."""
    from qcowlib.formats.qcow2.snapshot_rw import NewSnapshot

    path = os.fspath(path)
    if not name:
        raise InvalidArgument("a snapshot name is required")
    part = _part(path, fmt, "create", name)
    now = time.time_ns() // 1000  # qemu-img records microseconds (g_get_real_time)
    new = NewSnapshot(name=name, date_sec=now // 1_000_000, date_nsec=now % 1_000_000 * 1000)
    try:
        with interrupt.deferred():  # in place: a signal waits until the change is whole
            part.create(path, new)
    except QcowlibError as exc:
        raise _prefixed(exc, f"Could not create snapshot '{name}': ") from None


def apply_snapshot(path: str | os.PathLike[str], name: str, fmt: str | None = None) -> None:
    """``qemu-img snapshot -a NAME``: revert the disk to a snapshot (by ID, then name)."""
    from qcowlib.formats.qcow2.snapshot_rw import SnapshotNotFound

    path = os.fspath(path)
    part = _part(path, fmt, "apply", name)
    try:
        with interrupt.deferred():
            part.apply(path, name)
    except SnapshotNotFound:
        raise SnapshotNotFound(
            f"Could not apply snapshot '{name}': Failed to load snapshot: No such file or directory"
        ) from None
    except QcowlibError as exc:
        raise _prefixed(exc, f"Could not apply snapshot '{name}': ") from None


def delete_snapshot(path: str | os.PathLike[str], name: str, fmt: str | None = None) -> None:
    """``qemu-img snapshot -d NAME``: delete the first snapshot with this name."""
    path = os.fspath(path)
    part = _part(path, fmt, "delete", name)
    try:
        with interrupt.deferred():
            part.delete(path, name)
    except QcowlibError as exc:
        raise _prefixed(exc, f"Could not delete snapshot '{name}': ") from None


def _prefixed(exc: QcowlibError, prefix: str) -> QcowlibError:
    """``exc`` with its message after qemu-img's ``Could not ... snapshot`` prefix."""
    exc.message = prefix + exc.message
    exc.args = (exc.message,)
    return exc
