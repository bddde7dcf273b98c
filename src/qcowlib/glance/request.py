"""What ``upload`` is asked to do and what it answers: the request (Glance's
``image-create`` options, checked before anything is sent), its result, and its errors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from qcowlib.errors import InvalidArgument, QcowlibError
from qcowlib.formats import registry

__all__ = [
    "CONTAINER_FORMATS",
    "FLATTEN_TO",
    "TAG_MAX",
    "VISIBILITIES",
    "Computed",
    "UploadError",
    "UploadRequest",
    "UploadResult",
    "ValidationRefused",
    "parse_properties",
]

#: Glance's default ``container_formats``.  Glance inspects the data only for ``bare``.
CONTAINER_FORMATS = ("bare", "ovf", "ova", "aki", "ari", "ami", "docker", "compressed")
VISIBILITIES = ("public", "private", "shared", "community")
#: Glance's limit on the length of a tag (its schema: maxLength 255).
TAG_MAX = 255
#: What ``--flatten`` can send, by disk_format, with its output options (a VMDK goes as
#: streamOptimized, the subformat made for transfers that Glance and vSphere accept).
FLATTEN_TO: dict[str, dict[str, str]] = registry.upload_targets()


class UploadError(QcowlibError):
    """The upload failed or Glance's record disagrees with what was sent."""


class ValidationRefused(QcowlibError):
    """The image did not pass validation; nothing was sent."""

    def __init__(self, message: str, findings: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.findings = findings


class Computed(TypedDict):
    """What qcowlib computed of the bytes it sent."""

    size: int
    md5: str
    sha512: str


class UploadResult(TypedDict):
    """What :func:`upload` returns (``upload --output json``): the image as Glance
    reports it after the upload, and what qcowlib computed while sending it."""

    id: str
    name: str
    status: str
    disk_format: str
    size: int
    virtual_size: int | None
    checksum: str
    os_hash_algo: str
    os_hash_value: str
    container_format: str
    visibility: str
    protected: bool
    tags: list[str]
    stores: list[str]
    computed: Computed


@dataclass
class UploadRequest:
    """What to upload and the image properties to set (``glance image-create`` options)."""

    path: str | os.PathLike[str]
    name: str
    disk_format: str | None = None
    container_format: str = "bare"
    flatten: bool = False
    min_disk: int | None = None
    min_ram: int | None = None
    visibility: str | None = None
    protected: bool = False
    properties: dict[str, str] = field(default_factory=dict)
    force: bool = False
    src_format: str | None = None
    #: What of the chain ``flatten`` reads: ``follow``, ``contained`` or ``none``.
    backing_policy: str = "follow"
    #: Read an image another process has open for writing (qemu-img ``-U``).
    force_share: bool = False
    tags: list[str] = field(default_factory=list)
    #: Interoperable import (stage, then ``glance-direct``) instead of a direct upload.
    use_import: bool = False
    #: A store of a multi-store Glance (``X-Image-Meta-Store``; with import, ``stores``).
    store: str | None = None

    def check(self) -> None:
        """Refuse values Glance would refuse, before anything is sent.

        Raises :class:`InvalidArgument`.
        """
        if not self.name.strip():
            raise InvalidArgument("the image name is empty")
        if self.container_format not in CONTAINER_FORMATS:
            known = ", ".join(CONTAINER_FORMATS)
            raise InvalidArgument(f"container format {self.container_format!r} (Glance: {known})")
        if self.container_format != "bare":
            if self.flatten:
                raise InvalidArgument(
                    "--flatten sends a bare disk image: use --container-format bare"
                )
            if self.disk_format is None:
                raise InvalidArgument(
                    f"--container-format {self.container_format}: give --disk-format (the "
                    "format of the disk inside; it is not detected through a container)"
                )
        if self.visibility is not None and self.visibility not in VISIBILITIES:
            raise InvalidArgument(f"visibility {self.visibility!r} (one of {VISIBILITIES})")
        for what, value in (("min_disk", self.min_disk), ("min_ram", self.min_ram)):
            if value is not None and value < 0:
                raise InvalidArgument(f"{what} is negative: {value}")
        for tag in self.tags:
            if not tag.strip() or len(tag) > TAG_MAX:
                raise InvalidArgument(f"tag {tag!r}: tags are 1 to {TAG_MAX} characters")
        if self.store is not None and not self.store.strip():
            raise InvalidArgument("the store id is empty")


def parse_properties(items: list[str]) -> Mapping[str, str]:
    """``K=V`` strings to a mapping (``--property`` may repeat)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"property {item!r} is not KEY=VALUE")
        out[key] = value
    return out
