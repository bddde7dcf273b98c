"""Pure helpers the cluster-map codecs (QED, qcow v1, Parallels) share.

Each format declares its own header layout, dtypes and rules in its package; what is
the same for all of them lives here once: an error that names a header field at its
offset, a table of fixed-width entries decoded whole with numpy from an explicit-endian
dtype, the first bad entry of a table (or of several tables decoded together) named in
an error, and a backing file name's bytes.  Nothing here opens a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from qcowlib.errors import CorruptImage, QcowlibError, TruncatedImage

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from qcowlib.formats._record import FixedLayout

__all__ = ["bad_entry", "decode_backing_name", "decode_entries", "field_error"]


def field_error(
    layout: FixedLayout, cls: type[QcowlibError], message: str, field: str
) -> QcowlibError:
    """A ``cls`` error about header ``field`` of ``layout``, at the field's offset."""
    return cls(message, structure=layout.what, field=field, offset=layout.offset_of(field))


def decode_entries(
    raw: bytes | bytearray | memoryview, count: int, dtype: str, what: str, offset: int
) -> npt.NDArray[np.unsignedinteger]:
    """``count`` entries of ``dtype`` (explicit byte order: ``"<u8"``, ``">u8"``,
    ``"<u4"``) from the start of ``raw``, as a native-endian array of their own.

    ``raw`` was read from file offset ``offset``; raises :class:`TruncatedImage` naming
    ``what`` there when it holds fewer than ``count`` entries.
    """
    import numpy as np

    dt = np.dtype(dtype)
    if count < 0 or len(raw) < count * dt.itemsize:
        raise TruncatedImage(
            f"{what} is truncated ({len(raw)} of {count * dt.itemsize} bytes)",
            structure=what,
            offset=offset,
        )
    out: npt.NDArray[np.unsignedinteger] = np.frombuffer(raw, dtype=dt, count=count).astype(
        dt.newbyteorder("=")
    )
    return out


def bad_entry(
    bad: npt.NDArray[np.bool_],
    entries: npt.NDArray[np.integer],
    table_offsets: int | Sequence[int],
    what: str,
    describe: str,
    width: int = 8,
    first: int = 0,
) -> QcowlibError | None:
    """A :class:`CorruptImage` naming the first entry where ``bad`` is set, or None.

    ``entries`` (and ``bad``) hold one table, or several tables of the same length as
    the rows of a 2-D array, each read from the file offset in ``table_offsets``.
    ``describe`` is a format string for the message: ``{i}`` is the entry's index in
    its table (plus ``first``), ``{v:#x}`` its value.
    """
    import numpy as np

    flat = np.flatnonzero(bad)
    if flat.size == 0:
        return None
    k = int(flat[0])
    per_table = entries.shape[-1] if entries.ndim > 1 else entries.size
    table, j = divmod(k, per_table) if per_table else (0, k)
    base = table_offsets if isinstance(table_offsets, int) else int(table_offsets[table])
    i = first + j
    value = int(entries.reshape(-1)[k])
    return CorruptImage(
        describe.format(i=i, v=value),
        structure=what,
        field=f"entry[{i}]",
        offset=base + width * j,
    )


def decode_backing_name(raw: bytes) -> str:
    """A backing file name from its bytes (QEMU keeps it up to a NUL, if any)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
