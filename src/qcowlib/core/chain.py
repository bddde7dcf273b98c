"""Backing policy and the resolution and opening of file names found inside images.

Backing, external data and VMDK extent file names are untrusted: they are resolved
relative to the naming image's directory as qemu-img does, protocol names (``nbd:``,
``json:``) are refused, and the caller's :class:`BackingPolicy` decides about absolute
paths, paths that escape the top image's directory and unrecorded formats.  Whatever
the policy, a linked file must be a regular file outside /proc and /sys
(:class:`~qcowlib.core.hostfile.HostFile` with ``linked``), and it is opened with
qemu-img's shared read locks (:mod:`qcowlib.core.locks`).  Opening a chain (which
needs the registry of formats) is :mod:`qcowlib.formats.opener`'s job.
"""

from __future__ import annotations

import os
import re
from typing import Final, NamedTuple

from qcowlib.core.hostfile import HostFile, is_within
from qcowlib.errors import InvalidArgument, QcowlibError, QcowlibIOError, UnsafeBackingPath

__all__ = [
    "MAX_CHAIN_DEPTH",
    "POLICY_NAMES",
    "SAFE",
    "BackingPolicy",
    "as_policy",
    "open_linked",
    "resolve_linked_path",
]

#: Default cap on the number of images in a chain (top included).  qemu-img 7.2 reads
#: 1,000-deep chains (and crashes somewhere below 5,000); chains are opened and read
#: without recursion here, so the cap only bounds the work a crafted set of files can
#: cause (an open file and a few kB per layer).
MAX_CHAIN_DEPTH: Final = 2048
#: The names ``--backing-policy`` and ``backing_policy=`` accept.
POLICY_NAMES: Final = ("follow", "contained", "none")
_PROTOCOL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class BackingPolicy(NamedTuple):
    """What opening may follow, and how.  The defaults behave like qemu-img (``follow``).

    :meth:`named` builds the three policies of ``--backing-policy``; the fields allow
    finer choices.  Whatever the fields say, devices, FIFOs, sockets, directories and
    files under /proc and /sys are never opened as backing, data or extent files.
    """

    #: Open backing files at all (False: the top image only, reads of unallocated
    #: ranges return zeros and ``backing`` is None).
    follow: bool = True
    #: Open an external data file named by the image.
    follow_data_file: bool = True
    #: Accept absolute backing/data/extent file paths.
    allow_absolute: bool = True
    #: Accept relative paths that leave the image's directory (``../``).
    allow_escape: bool = True
    #: Probe the backing format when the image does not record it.
    probe_format: bool = True
    #: Linked files must lie inside the top image's directory once symlinks are
    #: resolved (a ``link -> /etc/shadow``, or ``dir -> /etc`` then ``dir/passwd``, is
    #: refused).
    contained: bool = False
    max_depth: int = MAX_CHAIN_DEPTH
    #: Share every permission with other processes (qemu-img ``-U``): open images that
    #: another process holds open for writing instead of refusing them.
    force_share: bool = False
    #: The top image's directory with symlinks resolved; set by the opener for
    #: ``contained`` (None: the naming image's own directory).
    root: str | None = None

    @classmethod
    def named(cls, name: str, *, force_share: bool = False) -> BackingPolicy:
        """``follow`` (qemu-img's behaviour), ``contained`` or ``none``.

        ``contained``: only relative names that stay inside the top image's directory
        after resolving symlinks, with the backing format recorded in the image.
        ``none``: no backing file is opened (unallocated ranges read as zeros); data and
        extent files, which are part of the top image itself, follow the ``contained``
        rules.  Raises :class:`InvalidArgument` for any other name.
        """
        if name == "follow":
            return cls(force_share=force_share)
        if name not in POLICY_NAMES:
            raise InvalidArgument(
                f"unknown backing policy {name!r} (choose from {', '.join(POLICY_NAMES)})"
            )
        return cls(
            follow=name != "none",
            allow_absolute=False,
            allow_escape=False,
            probe_format=False,
            contained=True,
            force_share=force_share,
        )

    @property
    def name(self) -> str:
        """The :data:`POLICY_NAMES` entry this policy matches, or ``custom``."""
        for name in POLICY_NAMES:
            if self._replace(force_share=False, root=None) == BackingPolicy.named(name):
                return name
        return "custom"

    def rooted(self, top: str) -> BackingPolicy:
        """This policy bound to the top image ``top`` (its directory is the root that
        ``contained`` keeps linked files in)."""
        if not self.contained or self.root is not None:
            return self
        return self._replace(root=os.path.realpath(os.path.dirname(top) or "."))


#: The strict policy: ``contained``.
SAFE: Final = BackingPolicy.named("contained")


def as_policy(value: str | BackingPolicy | None, *, force_share: bool = False) -> BackingPolicy:
    """A policy from an API argument: a name of :data:`POLICY_NAMES`, a policy, or None
    (``follow``); ``force_share`` is added to it.  Raises :class:`InvalidArgument`."""
    if value is None:
        policy = BackingPolicy()
    elif isinstance(value, BackingPolicy):
        policy = value
    elif isinstance(value, str):
        policy = BackingPolicy.named(value)
    else:
        raise InvalidArgument(f"backing_policy must be one of {', '.join(POLICY_NAMES)}")
    if force_share and not policy.force_share:
        policy = policy._replace(force_share=True)
    return policy


def resolve_linked_path(image: str, name: str, what: str, policy: BackingPolicy) -> str:
    """The path of a file named inside ``image`` (a backing, data or extent file), checked.

    Relative names are joined to the image's directory without normalisation, as
    qemu-img shows them (``full-backing-filename``).  Raises
    :class:`UnsafeBackingPath` for names the policy refuses.
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
            raise UnsafeBackingPath(
                f"{what} {name!r} is an absolute path, which backing policy "
                f"{policy.name!r} refuses",
                file=image,
            )
        full = name
    else:
        if not policy.allow_escape:
            norm = os.path.normpath(name)
            if norm == ".." or norm.startswith(".." + os.sep):
                raise UnsafeBackingPath(
                    f"{what} {name!r} leaves the image's directory, which backing policy "
                    f"{policy.name!r} refuses",
                    file=image,
                )
        directory = os.path.dirname(image)
        full = os.path.join(directory, name) if directory else name
    if policy.contained:
        root = _root(image, policy)
        real = os.path.realpath(full)
        if not is_within(real, root):
            raise UnsafeBackingPath(
                f"{what} {name!r} resolves to {real!r}, outside {root!r} (symlinks "
                f"followed), which backing policy {policy.name!r} refuses",
                file=image,
            )
    return full


def _root(image: str, policy: BackingPolicy) -> str:
    return policy.root or os.path.realpath(os.path.dirname(image) or ".")


def open_linked(image: str, name: str, what: str, policy: BackingPolicy) -> tuple[HostFile, str]:
    """Open the file ``name`` that ``image`` links to (a data or extent file) read-only,
    as ``policy`` allows, with qemu-img's shared read locks; returns it and its path.

    Raises :class:`UnsafeBackingPath` for a name the policy refuses and
    :class:`QcowlibIOError` (naming ``image`` and the file) when it cannot be opened:
    missing, a special or kernel file, or held for writing by another process.
    """
    from qcowlib.core.locks import take_read_locks

    full = resolve_linked_path(image, name, what, policy)
    within = _root(image, policy) if policy.contained else None
    try:
        host = HostFile(full, linked=True, within=within)
    except QcowlibError as exc:
        raise QcowlibIOError(f"cannot open {what} {full!r}: {exc.message}", file=image) from None
    try:
        take_read_locks(host.fd, full, force_share=policy.force_share)
    except QcowlibError as exc:
        host.close()
        raise type(exc)(f"cannot open {what} {full!r}: {exc.message}", file=image) from None
    return host, full
