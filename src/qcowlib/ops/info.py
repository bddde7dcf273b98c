"""``info``: what qemu-img info reports, as the same JSON structure."""

from __future__ import annotations

import os
from typing import Any, Literal, TypedDict, cast, overload

from qcowlib._json import JSONObject
from qcowlib.core.chain import BackingPolicy, as_policy
from qcowlib.core.disk import Disk, full_backing_filename
from qcowlib.formats.opener import open_disk

__all__ = ["ImageInfo", "full_backing_filename", "image_info", "info"]

#: qemu-img info's JSON object for one image: the keys every format has, and those that
#: only some formats or images have (a format's reader may add more, as qemu-img does).
ImageInfo = TypedDict(
    "ImageInfo",
    {
        "virtual-size": int,
        "filename": str,
        "format": str,
        "actual-size": int,
        "cluster-size": int,
        "dirty-flag": bool,
        "encrypted": bool,
        "backing-filename": str,
        "full-backing-filename": str,
        "backing-filename-format": str,
        "snapshots": list[JSONObject],
        "format-specific": JSONObject,
    },
    total=False,
)


def image_info(disk: Disk) -> ImageInfo:
    """qemu-img info's JSON object for one layer (keys and order as qemu-img 7.2).

    The format's reader supplies what only it knows (:meth:`Disk.info_head`,
    :attr:`Disk.info_cluster_size`, :meth:`Disk.info_tail`).
    """
    info: dict[str, Any] = disk.info_head()
    info["virtual-size"] = disk.virtual_size
    info["filename"] = disk.filename
    cluster_size = disk.info_cluster_size
    if cluster_size is not None:
        info["cluster-size"] = cluster_size
    info["format"] = disk.format
    actual = disk.actual_size()
    if actual is not None:
        info["actual-size"] = actual
    info.update(disk.info_tail())
    return cast(ImageInfo, info)


@overload
def info(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    backing_chain: Literal[False] = False,
    backing_policy: BackingPolicy | str | None = None,
    force_share: bool = False,
) -> ImageInfo: ...
@overload
def info(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    backing_chain: Literal[True],
    backing_policy: BackingPolicy | str | None = None,
    force_share: bool = False,
) -> list[ImageInfo]: ...
@overload
def info(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    backing_chain: bool,
    backing_policy: BackingPolicy | str | None = None,
    force_share: bool = False,
) -> ImageInfo | list[ImageInfo]: ...
def info(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    backing_chain: bool = False,
    backing_policy: BackingPolicy | str | None = None,
    force_share: bool = False,
) -> ImageInfo | list[ImageInfo]:
    """``qemu-img info`` for ``path``: one object, or a list top-first with the chain.

    Without ``backing_chain`` the backing file is not opened (as qemu-img info), and
    its name is shown whatever the policy; with it, the chain is opened as
    ``backing_policy`` allows (``none``: the top image alone).  ``force_share`` is
    qemu-img's ``-U``.
    """
    path = os.fspath(path)
    policy = as_policy(backing_policy, force_share=force_share)
    if not backing_chain:
        policy = policy._replace(follow=False)
    with open_disk(path, fmt, policy) as disk:
        if not backing_chain:
            return image_info(disk)
        return [image_info(d) for d in disk.chain]
