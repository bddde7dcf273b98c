"""Structure and backing-file checks of the formats qcowlib reads but does not write
(QED, legacy QCOW version 1, Parallels: the registry entries with a reader and no
writer).

Their structure is judged by opening the image alone with qcowlib's own reader (from the
registry, on the very file validate opened, never its backing file) and walking its
whole map, so that ``validate`` refuses exactly what ``convert`` would refuse: a bad
header, a table past the end of the file, an entry that points outside it, a Parallels
Format Extension QEMU would not load.  The backing file an image names is read through
the same reader's hooks, and reported, never opened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from qcowlib.core.disk import Disk
from qcowlib.errors import QcowlibError, UnsupportedFeature
from qcowlib.validate.engine import Context
from qcowlib.validate.rules._common import Findings, flatten_cmd, format_name, shown_name

__all__ = ["backing_of", "structure_of"]


@contextmanager
def _layer(ctx: Context, fmt: str) -> Iterator[Disk]:
    """The image opened alone by ``fmt``'s reader (its backing file is not opened)."""
    from qcowlib.core.chain import BackingPolicy
    from qcowlib.core.hostfile import HostFile
    from qcowlib.formats import registry

    host = HostFile(ctx.same_file_path())
    try:
        disk = registry.by_name(fmt).opener()(host, ctx.path, BackingPolicy(follow=False))
    except BaseException:
        host.close()
        raise
    with disk:
        yield disk


def structure_of(fmt: str) -> Callable[[Context], Findings]:
    """The ``structure`` check of format ``fmt``: its reader opens and maps the image.

    Encryption is left to the ``encrypted`` rule, which says more about it.
    """

    def check(ctx: Context) -> Findings:
        try:
            with _layer(ctx, fmt) as disk:
                for _ in disk.layer_extents():
                    pass
        except UnsupportedFeature as exc:
            # ``encrypted`` explains it, when it runs (for what looks like qcow2).
            if exc.field != "crypt_method" or "qcow2" not in ctx.formats:
                raise
        yield from ()

    return check


def backing_of(fmt: str) -> Callable[[Context], Findings]:
    """The ``backing-file`` check of format ``fmt``, through its reader's hooks."""

    def check(ctx: Context) -> Findings:
        try:
            with _layer(ctx, fmt) as disk:
                name, bfmt = disk.backing_file_name, disk.backing_file_format
        except QcowlibError:
            return  # structure says why
        if name is None:
            return
        shown = f" (format {bfmt})" if bfmt else ""
        yield ctx.error(
            f"this {format_name(fmt)} image has the backing file {shown_name(name)}{shown}: "
            "it holds only the changes on top of that file, which validate does not open "
            f"and Glance will not have. Run {flatten_cmd(ctx)} first and upload the result"
        )

    return check
