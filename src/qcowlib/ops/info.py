"""``info``: what qemu-img info reports, as the same JSON structure."""

from __future__ import annotations

from typing import Any

from qcowlib.core.chain import BackingPolicy, as_policy
from qcowlib.core.disk import Disk, full_backing_filename
from qcowlib.formats.opener import open_disk

__all__ = ["full_backing_filename", "image_info", "info"]


def image_info(disk: Disk) -> dict[str, Any]:
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
    return info


def info(
    path: str,
    fmt: str | None = None,
    *,
    backing_chain: bool = False,
    backing_policy: BackingPolicy | str | None = None,
    force_share: bool = False,
) -> dict[str, Any] | list[dict[str, Any]]:
    """``qemu-img info`` for ``path``: one object, or a list top-first with the chain.

    Without ``backing_chain`` the backing file is not opened (as qemu-img info), and
    its name is shown whatever the policy; with it, the chain is opened as
    ``backing_policy`` allows (``none``: the top image alone).  ``force_share`` is
    qemu-img's ``-U``.
    """
    policy = as_policy(backing_policy, force_share=force_share)
    if not backing_chain:
        policy = policy._replace(follow=False)
    with open_disk(path, fmt, policy) as disk:
        if not backing_chain:
            return image_info(disk)
        return [image_info(d) for d in disk.chain]
