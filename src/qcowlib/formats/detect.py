"""Image format detection ("probing") from the leading and trailing bytes of a file.

Pure: :func:`probe` takes the first :data:`PROBE_HEAD_SIZE` bytes, the last
:data:`PROBE_TAIL_SIZE` bytes and the file size, and returns a :class:`Probe`.  It opens
no files and never raises; anything it does not recognise is ``raw``.

Each format recognises itself: its ``formats/<fmt>/probe.py`` follows QEMU's probe
function for it (a ``BlockDriver``'s ``bdrv_probe``), so that qcowlib and ``qemu-img``
agree on what a file is, with the deliberate differences documented there (a fixed VHD
found by its footer, a DMG found by its trailer rather than by its name, LUKS2, ISO
9660).  The registry (:func:`qcowlib.formats.registry.probe_order`) says which probes
there are and in which order this module asks them; the first that answers wins.

Order of the checks: the headers that an image tool writes at offset 0 of its own file
(qcow2, qcow, qed, parallels, vmdk binary, vhdx, vdi, dynamic vpc, bochs, cloop) come
first; then the DMG trailer and the fixed-VHD footer, whose data area starts at offset 0
and so may itself begin with anything (for instance a LUKS header or an ISO file system
inside the virtual disk); then luks, the vmdk text descriptor and iso; ``raw`` last.  An
empty file shows its probes no bytes, and is ``raw`` (as in QEMU).

Probing is a convenience for files the user trusts: a raw image's first sectors are
written by its guest, which can make them look like any format.  Callers that know the
format should not probe.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from qcowlib.core.probe import QEMU_PROBE_BUF_SIZE
from qcowlib.formats import registry

__all__ = [
    "FORMATS",
    "PROBE_HEAD_SIZE",
    "PROBE_TAIL_SIZE",
    "QEMU_PROBE_BUF_SIZE",
    "Probe",
    "probe",
]

#: Leading bytes :func:`probe` wants: enough for the ISO 9660 volume descriptor at
#: 0x8000 and for the embedded descriptor of a hosted sparse VMDK (20 sectors from 512).
PROBE_HEAD_SIZE: Final[int] = 64 * 1024
#: Trailing bytes :func:`probe` wants: one VHD footer.
PROBE_TAIL_SIZE: Final[int] = 512
#: Formats :func:`probe` can report, with ``qemu-img``'s names ("vpc" is VHD), in the
#: order of their first probe.
FORMATS: Final[tuple[str, ...]] = tuple(
    f.name for f in sorted((f for f in registry.FORMATS if f.probes), key=lambda f: min(f.probes))
)


class Probe(NamedTuple):
    """What :func:`probe` found.

    ``format`` is one of :data:`FORMATS`.  ``detail`` refines it where that matters to the
    caller: ``"footer-only"`` for a fixed VHD found by its footer, ``"descriptor"`` for a
    VMDK text descriptor, the ``createType`` of a binary VMDK when its embedded descriptor
    was seen, ``"unsupported-version"`` for a qcow header with a version above 3;
    ``None`` otherwise.
    """

    format: str
    detail: str | None = None


def probe(head: bytes, tail: bytes, file_size: int) -> Probe:
    """Detect the format of an image from its first and last bytes.

    ``head`` is the first ``min(PROBE_HEAD_SIZE, file_size)`` bytes of the file and
    ``tail`` the last ``min(PROBE_TAIL_SIZE, file_size)`` bytes (they overlap for small
    files).  Shorter buffers are accepted; checks that need bytes not given fail.  Never
    raises; returns ``Probe("raw", None)`` when nothing else matches.  See the module
    documentation for the order and the formats' probe modules for their rules.
    """
    if file_size <= 0:
        head = tail = b""
    else:
        head = bytes(head[:PROBE_HEAD_SIZE])
        tail = bytes(tail[-PROBE_TAIL_SIZE:]) if tail else b""
    order = registry.probe_order()
    for name, check in order:
        found = check(head, tail, file_size)
        if found is not None:
            return Probe(name, found.detail)
    return Probe(order[-1][0])  # not reached: the last probe (raw's) answers for anything
