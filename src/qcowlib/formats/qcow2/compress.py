"""Compressed cluster codecs: zlib (raw deflate) and zstd (qcow2.txt "compression type").

Decompression is bounded: it never produces more than one cluster, whatever the input,
so a hostile stream cannot make it allocate more.
"""

from __future__ import annotations

import io
import threading
import zlib
from typing import Any

from qcowlib.errors import CorruptImage, UnsupportedFeature
from qcowlib.formats.qcow2.header import COMPRESSION_TYPE_ZLIB, COMPRESSION_TYPE_ZSTD

#: QEMU writes raw deflate with a 4 KiB window (-12); any window up to 32 KiB decodes.
_ZLIB_WBITS_READ = -15
_ZLIB_WBITS_WRITE = -12


def decompress_cluster(data: bytes | memoryview, compression_type: int, cluster_size: int) -> bytes:
    """Decompress one cluster; the output must be exactly ``cluster_size`` bytes.

    ``data`` may be longer than the compressed stream (descriptors give an upper bound).
    Raises :class:`CorruptImage` when the stream is invalid or too short.
    """
    if compression_type == COMPRESSION_TYPE_ZLIB:
        try:
            d = zlib.decompressobj(_ZLIB_WBITS_READ)
            out = d.decompress(data, cluster_size)
        except zlib.error as exc:
            raise CorruptImage(f"invalid zlib-compressed cluster: {exc}") from None
    elif compression_type == COMPRESSION_TYPE_ZSTD:
        out = _zstd_decompress(data, cluster_size)
    else:
        raise UnsupportedFeature(f"unknown compression type {compression_type}")
    if len(out) != cluster_size:
        raise CorruptImage(
            f"compressed cluster decompresses to {len(out)} bytes, not {cluster_size}"
        )
    return out


def _zstd_decompress(data: bytes | memoryview, cluster_size: int) -> bytes:
    import zstandard

    try:
        dctx = getattr(_local, "zstd_d", None)
        if dctx is None:
            dctx = _local.zstd_d = zstandard.ZstdDecompressor()
        reader = dctx.stream_reader(io.BytesIO(bytes(data)), read_across_frames=True)
        chunks = []
        remaining = cluster_size
        while remaining:
            chunk = reader.read(remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    except zstandard.ZstdError as exc:
        raise CorruptImage(f"invalid zstd-compressed cluster: {exc}") from None


_local = threading.local()


def _zstd_compressor(level: int) -> Any:
    """One compressor per thread and level: making one per cluster costs more than the
    compression of a small cluster itself."""
    import zstandard

    cache: dict[int, Any] | None = getattr(_local, "zstd", None)
    if cache is None:
        cache = _local.zstd = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level)
    return comp


def compress_cluster(data: bytes | memoryview, compression_type: int, level: int = -1) -> bytes:
    """Compress one cluster as QEMU does (raw deflate, or one zstd frame)."""
    if compression_type == COMPRESSION_TYPE_ZLIB:
        c = zlib.compressobj(
            level if level >= 0 else zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, _ZLIB_WBITS_WRITE
        )
        return c.compress(data) + c.flush()
    if compression_type == COMPRESSION_TYPE_ZSTD:
        return bytes(_zstd_compressor(level if level > 0 else 3).compress(data))
    raise UnsupportedFeature(f"unknown compression type {compression_type}")
