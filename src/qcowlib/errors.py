"""The one error root of qcowlib and the subclasses that say what went wrong.

Everything qcowlib raises on purpose derives from :class:`QcowlibError`.  Subclasses
split along *who* was wrong (the caller's arguments, or the data in a file) and *what*
was wrong with it, so that callers can react without parsing messages.  Errors carry the
file, the on-disk structure, the field and the file offset at fault where known.

This module imports nothing from qcowlib.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "BackingChainError",
    "BackingFormatUnknown",
    "BackingLoop",
    "BackingNotFound",
    "BackingTooDeep",
    "CorruptImage",
    "DiskClosed",
    "FormatError",
    "ImageLocked",
    "InvalidArgument",
    "QcowlibError",
    "QcowlibFileNotFoundError",
    "QcowlibIOError",
    "QcowlibPermissionError",
    "TruncatedImage",
    "UnsafeBackingPath",
    "UnsupportedFeature",
]


class QcowlibError(Exception):
    """Root of every error qcowlib raises on purpose.

    ``file``, ``structure``, ``field`` and ``offset`` name the place at fault when known;
    ``str(err)`` renders them after the message.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        structure: str | None = None,
        field: str | None = None,
        offset: int | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.structure = structure
        self.field = field
        self.offset = offset
        super().__init__(message)

    def with_file(self, file: str) -> QcowlibError:
        """Fill in the file name if it is not known yet; returns ``self`` for ``raise``."""
        if self.file is None:
            self.file = file
        return self

    def __str__(self) -> str:
        where = []
        if self.structure is not None:
            place = self.structure
            if self.field is not None:
                place += f".{self.field}"
            where.append(place)
        if self.offset is not None:
            where.append(f"offset {self.offset:#x}")
        text = self.message
        if where:
            text += f" ({', '.join(where)})"
        if self.file is not None:
            text = f"{self.file}: {text}"
        return text


class InvalidArgument(QcowlibError, ValueError):
    """The caller asked for something impossible (bad size, option, range)."""


class QcowlibIOError(QcowlibError, OSError):
    """An operating-system error while reading or writing an image.

    ``errno`` (when the system gave one) is kept as :attr:`errno`, with its text as
    :attr:`strerror`, so code that wraps this error again still says why it failed.
    """

    def __init__(
        self,
        message: str,
        *,
        errno: int | None = None,
        file: str | None = None,
        structure: str | None = None,
        field: str | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(message, file=file, structure=structure, field=field, offset=offset)
        if errno is not None:
            import os

            self.errno = errno
            self.strerror = os.strerror(errno)


class QcowlibFileNotFoundError(QcowlibIOError, FileNotFoundError):
    """An image (or a file it names) does not exist: also a :class:`FileNotFoundError`,
    so ``except FileNotFoundError`` works as for :func:`open`."""

    def __init__(self, message: str = "no such file", *, file: str | None = None) -> None:
        super().__init__(message, file=file)
        self.errno = errno.ENOENT
        self.strerror = os.strerror(errno.ENOENT)
        self.filename = file


class QcowlibPermissionError(QcowlibIOError, PermissionError):
    """An image cannot be opened for lack of permission: also a :class:`PermissionError`."""

    def __init__(self, message: str = "permission denied", *, file: str | None = None) -> None:
        super().__init__(message, file=file)
        self.errno = errno.EACCES
        self.strerror = os.strerror(errno.EACCES)
        self.filename = file


def os_error(exc: OSError, message: str, *, file: str | None = None) -> QcowlibIOError:
    """The :class:`QcowlibIOError` for an :class:`OSError` from the system: a missing
    file is also a :class:`FileNotFoundError`, a refusal also a :class:`PermissionError`."""
    if isinstance(exc, FileNotFoundError):
        return QcowlibFileNotFoundError(message, file=file)
    if isinstance(exc, PermissionError):
        return QcowlibPermissionError(message, file=file)
    return QcowlibIOError(message, errno=exc.errno, file=file)


class DiskClosed(QcowlibError, ValueError):
    """An operation on a disk (or stream) after :meth:`close` (``disk is closed``).

    Also a :class:`ValueError`, as an operation on a closed Python file is.
    """

    def __init__(self, message: str = "disk is closed", *, file: str | None = None) -> None:
        super().__init__(message, file=file)


class FormatError(QcowlibError):
    """The data is not a valid image of the expected format."""


class TruncatedImage(FormatError):
    """A structure extends past the end of the file."""


class CorruptImage(FormatError):
    """Structures parse but contradict each other or the format's rules."""


class UnsupportedFeature(QcowlibError):
    """A valid image uses a feature qcowlib does not implement (e.g. encryption)."""


class SourceChanged(QcowlibError):
    """A source image changed while it was being read for a new image or a stream.

    Writers and streams plan the output from the source first and read it again to emit
    it; a change in between would make the output disagree with its own plan.
    """

    def __init__(self, message: str = "the source changed while it was being read") -> None:
        super().__init__(message)


class ImageLocked(QcowlibError):
    """Another process holds a lock on the image."""


class BackingChainError(QcowlibError):
    """A backing file cannot be followed."""


class BackingNotFound(BackingChainError):
    """A backing file named by an image does not exist."""


class BackingLoop(BackingChainError):
    """Following backing files leads back to an image already in the chain."""


class BackingTooDeep(BackingChainError):
    """The backing chain is longer than the configured cap."""


class UnsafeBackingPath(BackingChainError):
    """A backing path is absolute or escapes the image's directory, and policy forbids it."""


class BackingFormatUnknown(BackingChainError):
    """The format of a backing file is neither recorded nor acceptable to probe."""


class BackingMismatch(BackingChainError):
    """A backing file is not the one the image was made over (a VMDK parent's CID changed)."""
