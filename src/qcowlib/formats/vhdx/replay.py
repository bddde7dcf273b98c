"""Finding and replaying a VHDX log in the file (MS-VHDX 2.3.3), as QEMU does on open.

QEMU's ``vhdx_parse_log`` runs on every open: an image whose log holds an active
sequence (:func:`qcowlib.formats.vhdx.log.find_active_sequence`) is refused when opened
read-only, and replayed when opened read-write (``qemu-img check -r``).  A log GUID
without a valid entry is left as it is, and the image is read as if it had no log.

A replay (:func:`replay_log`) is planned in full first, so that a log that cannot be
replayed writes nothing; then, as QEMU's ``vhdx_log_flush``: both headers are updated
(new file write GUID for the session, new data write GUID, the log GUID kept), the
planned writes and resizes are made and flushed, and both headers are updated again
with a zero log GUID.  Until that last step the headers still name the log, so a replay
that fails half-way is done again the next time.  The GUIDs are random (QEMU's are
too), so two replays of the same file differ in their headers only.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Final

from qcowlib.errors import CorruptImage, UnsupportedFeature
from qcowlib.formats.vhdx import codec as vhdx
from qcowlib.formats.vhdx import log as vhdx_log

if TYPE_CHECKING:
    from qcowlib.core.hostfile import HostFile

__all__ = ["active_sequence", "refuse_unreplayed", "replay_log"]

_LOG = logging.getLogger(__name__)
_ZEROS: Final = bytes(1 << 20)


def active_sequence(
    host: HostFile, header: vhdx.Header, header_at: int
) -> tuple[bytes, vhdx_log.LogSequence] | None:
    """The log region and its active sequence, or None when there is none to replay.

    Raises what :func:`~qcowlib.formats.vhdx.log.check_log_fields` and
    :func:`~qcowlib.formats.vhdx.log.find_active_sequence` raise.
    """
    present = header.log_needs_replay and header.log_length != 0
    vhdx_log.check_log_fields(
        header.log_offset, header.log_length, header.log_version, header_at, present=present
    )
    if not present:
        return None
    # Capped by check_log_fields (MAX_LOG_LENGTH); past the end of the file reads zeros,
    # as QEMU reads it.
    data = host.pread(header.log_offset, header.log_length)
    seq = vhdx_log.find_active_sequence(data, header.log_guid, header.log_offset)
    return None if seq is None else (data, seq)


def refuse_unreplayed(host: HostFile, header: vhdx.Header, header_at: int, name: str) -> None:
    """Raise :class:`UnsupportedFeature` as QEMU refuses a read-only open of an image
    whose log must be replayed (and whatever :func:`active_sequence` raises)."""
    found = active_sequence(host, header, header_at)
    if found is not None:
        raise UnsupportedFeature(
            f"VHDX image file '{name}' opened read-only, but contains a log that needs to "
            f"be replayed; to replay the log, run: qcowlib check -r all '{name}'",
            structure="vhdx log",
            offset=header.log_offset + found[1].start,
        )


class _Headers:
    """Both header blocks as read, and which is current (QEMU's ``s->headers``)."""

    def __init__(self, area: bytes, current_at: int) -> None:
        size = vhdx.VHDX_HEADER_SIZE
        self.blocks = [bytes(area[at : at + size]) for at in vhdx.VHDX_HEADER_OFFSETS]
        self.current = vhdx.VHDX_HEADER_OFFSETS.index(current_at)
        self.session = uuid.uuid4().bytes_le

    def update(self, host: HostFile, *, new_data_guid: bool, log_guid: bytes | None) -> None:
        """QEMU's ``vhdx_update_header``: the other header becomes current."""
        other = 1 - self.current
        seq = int.from_bytes(self.blocks[self.current][8:16], "little") + 1
        block = vhdx.updated_header(
            self.blocks[other],
            sequence_number=seq,
            file_write_guid=self.session,
            data_write_guid=uuid.uuid4().bytes_le if new_data_guid else None,
            log_guid=log_guid,
        )
        host.pwrite(vhdx.VHDX_HEADER_OFFSETS[other], block)
        host.sync()
        self.blocks[other] = block
        self.current = other


def _apply(host: HostFile, plan: vhdx_log.ReplayPlan) -> None:
    for step in plan.steps:
        if isinstance(step, int):
            host.truncate(step)
        elif step.data is not None:
            host.pwrite(step.offset, step.data)
        else:
            done = 0
            while done < step.length:
                n = min(len(_ZEROS), step.length - done)
                host.pwrite(step.offset + done, memoryview(_ZEROS)[:n])
                done += n
    host.sync()


def replay_log(host: HostFile) -> bool:
    """Replay the log of the VHDX open (writable, locked) as ``host``; False when it has
    no active sequence (nothing is written then).

    Raises :class:`CorruptImage` for a log that cannot be replayed (before anything is
    written), what opening the headers raises, and :class:`QcowlibIOError` when a write
    fails (the headers then still name the log).
    """
    area = host.pread(0, min(host.size, vhdx.VHDX_HEADER_AREA))
    header, at = vhdx.current_header(area)
    found = active_sequence(host, header, at)
    if found is None:
        return False
    data, seq = found
    plan = vhdx_log.plan_replay(data, header.log_guid, seq, host.size, header.log_offset)
    if header.sequence_number + 4 >= 1 << 64:
        raise CorruptImage(
            "VHDX header sequence number is too large to update the headers",
            structure="vhdx header",
            field="sequence_number",
            offset=at + 8,
        )
    _LOG.info("replaying %d VHDX log entries (%d writes)", seq.count, len(plan.steps))
    headers = _Headers(area, at)
    for _ in range(2):  # vhdx_user_visible_write: a new data write GUID
        headers.update(host, new_data_guid=True, log_guid=None)
    _apply(host, plan)
    for _ in range(2):  # vhdx_log_reset: an empty log
        headers.update(host, new_data_guid=False, log_guid=bytes(16))
    return True
