"""Backing policy and the resolution of file names found inside images.

Backing (and external data file) names are untrusted: they are resolved relative to the
image's directory as qemu-img does, protocol names (``nbd:``, ``json:``) are refused,
and the caller's :class:`BackingPolicy` decides about absolute paths and paths that
escape the image's directory.  Opening a chain (which needs the registry of formats)
is :mod:`qcowlib.formats.opener`'s job.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from qcowlib.errors import (
    UnsafeBackingPath,
)

#: Default cap on the number of images in a chain (top included).  Deeper chains are
#: refused so that a crafted set of files cannot make opening unbounded.
MAX_CHAIN_DEPTH = 64
_PROTOCOL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class BackingPolicy(NamedTuple):
    """What opening may follow.  The defaults behave like qemu-img."""

    #: Open backing files at all (False: the top image only, reads of unallocated
    #: ranges return zeros and ``backing`` is None).
    follow: bool = True
    #: Open an external data file named by the image.
    follow_data_file: bool = True
    #: Accept absolute backing/data-file paths.
    allow_absolute: bool = True
    #: Accept relative paths that leave the image's directory (``../``).
    allow_escape: bool = True
    #: Probe the backing format when the image does not record it.
    probe_format: bool = True
    max_depth: int = MAX_CHAIN_DEPTH


SAFE = BackingPolicy(allow_absolute=False, allow_escape=False, probe_format=False)


def resolve_linked_path(image: str, name: str, what: str, policy: BackingPolicy) -> str:
    """The path of a file named inside ``image`` (a backing or data file), checked.

    Relative names are joined to the image's directory without normalisation, as
    qemu-img shows them (``full-backing-filename``).
    """
    if not name:
        raise UnsafeBackingPath(f"{what} name is empty", file=image)
    if "\0" in name:
        raise UnsafeBackingPath(f"{what} name contains a NUL byte", file=image)
    if _PROTOCOL_RE.match(name) and not os.path.isabs(name):
        raise UnsafeBackingPath(
            f"{what} {name!r} uses a protocol; only plain file paths are supported", file=image
        )
    if os.path.isabs(name):
        if not policy.allow_absolute:
            raise UnsafeBackingPath(f"{what} {name!r} is an absolute path", file=image)
        return name
    if not policy.allow_escape:
        norm = os.path.normpath(name)
        if norm == ".." or norm.startswith(".." + os.sep):
            raise UnsafeBackingPath(f"{what} {name!r} leaves the image's directory", file=image)
    directory = os.path.dirname(image)
    return os.path.join(directory, name) if directory else name
