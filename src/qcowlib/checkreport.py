"""The result of a consistency check, in ``qemu-img check``'s terms (format-neutral).

Every format's checker returns a :class:`CheckReport`; the CLI prints it as qemu-img
prints an ``ImageCheck`` (``qemu-img.c``: ``img_check``, ``dump_human_image_check``).
"""

from __future__ import annotations

from typing import Any, Final

from qcowlib._frozen import record
from qcowlib._json import JSONObject
from qcowlib.errors import UnsupportedFeature

__all__ = ["CheckNotSupported", "CheckReport"]

#: qemu-img's JSON key order (QDict bucket order of the ImageCheck members).
_JSON_ORDER: Final = (
    "image-end-offset",
    "compressed-clusters",
    "total-clusters",
    "corruptions",
    "corruptions-fixed",
    "check-errors",
    "leaks",
    "leaks-fixed",
    "allocated-clusters",
    "filename",
    "format",
    "fragmented-clusters",
)


class CheckNotSupported(UnsupportedFeature):
    """The image format has nothing to check, or cannot be repaired (``qemu-img check``
    exits 63 for it: "This image format does not support checks")."""

    status = 63


@record
class CheckReport:
    """The result of :func:`qcowlib.check`, with ``qemu-img check``'s fields and meaning.

    After a repair that fixed something, the counts describe the image *after* the
    repair (qemu-img's second pass) and ``corruptions_fixed``/``leaks_fixed`` what the
    repair fixed.  ``failure`` is set when the check could not complete (qemu-img prints
    ``Check failed: ...`` and no result); ``messages`` are the lines qemu-img prints to
    stderr while checking.
    """

    filename: str
    format: str
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    #: True when a repair fixed something and the counts come from the second pass.
    repaired: bool = False
    failure: str | None = None
    messages: tuple[str, ...] = ()

    @property
    def status(self) -> int:
        """qemu-img check's exit status: 0 clean, 1 failed, 2 corrupt, 3 leaks only."""
        if self.failure is not None or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def summary(self) -> str:
        """One line: the verdict and the counts that make it."""
        if self.failure is not None:
            return f"check failed: {self.failure}"
        problems = [
            f"{n} {what}"
            for n, what in (
                (self.check_errors, "check errors"),
                (self.corruptions, "corruptions"),
                (self.leaks, "leaked clusters"),
            )
            if n
        ]
        text = ", ".join(problems) if problems else "no errors"
        if self.corruptions_fixed or self.leaks_fixed:
            text += f" (fixed: {self.corruptions_fixed} corruptions, {self.leaks_fixed} leaks)"
        if self.total_clusters:
            text += f"; {self.allocated_clusters}/{self.total_clusters} clusters allocated"
        return text

    def __repr__(self) -> str:
        return f"<CheckReport {self.format} {self.filename!r}: {self.summary()}>"

    def to_json(self) -> JSONObject:
        """``qemu-img check --output=json``'s object (same keys, order and omissions)."""
        values: dict[str, Any] = {
            "image-end-offset": self.image_end_offset,
            "compressed-clusters": self.compressed_clusters,
            "total-clusters": self.total_clusters,
            "corruptions": self.corruptions,
            "corruptions-fixed": self.corruptions_fixed,
            "check-errors": self.check_errors,
            "leaks": self.leaks,
            "leaks-fixed": self.leaks_fixed,
            "allocated-clusters": self.allocated_clusters,
            "filename": self.filename,
            "format": self.format,
            "fragmented-clusters": self.fragmented_clusters,
        }
        always = ("filename", "format", "check-errors")
        return {k: values[k] for k in _JSON_ORDER if k in always or values[k]}

    def human(self) -> str:
        """``qemu-img check``'s human output (stdout), byte for byte."""
        out: list[str] = []
        if self.repaired:
            out.append(
                "The following inconsistencies were found and repaired:\n\n"
                f"    {self.leaks_fixed} leaked clusters\n"
                f"    {self.corruptions_fixed} corruptions\n\n"
                "Double checking the fixed image now...\n"
            )
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.\n")
        else:
            out.append(self._problems())
        if self.total_clusters and self.allocated_clusters:
            alloc = self.allocated_clusters
            out.append(
                f"{alloc}/{self.total_clusters} = "
                f"{alloc * 100.0 / self.total_clusters:.2f}% allocated, "
                f"{self.fragmented_clusters * 100.0 / alloc:.2f}% fragmented, "
                f"{self.compressed_clusters * 100.0 / alloc:.2f}% compressed clusters\n"
            )
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}\n")
        return "".join(out)

    def _problems(self) -> str:
        out = ""
        if self.corruptions:
            out += (
                f"\n{self.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it.\n"
            )
        if self.leaks:
            out += (
                f"\n{self.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data.\n"
            )
        if self.check_errors:
            out += f"\n{self.check_errors} internal errors have occurred during the check.\n"
        return out
