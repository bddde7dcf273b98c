"""The bytes ``upload`` sends and how: the source (the file, or its flattened chain), the
hashed HTTP body, the ``PUT`` of the data, and the requests' timeouts."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from qcowlib.core.digest import MultiHasher
from qcowlib.errors import InvalidArgument, QcowlibIOError
from qcowlib.glance.request import FLATTEN_TO, UploadError, UploadRequest

__all__ = [
    "CONNECT_TIMEOUT",
    "READ_CHUNK",
    "READ_TIMEOUT",
    "UPLOAD_CHUNK",
    "Progress",
    "Sender",
    "Source",
    "apply_timeouts",
    "put_data",
]

Progress = Callable[[int, int], None]
#: Pieces handed to the HTTP layer (and progress steps); also under the 1,048,568 bytes
#: that Glance behind uWSGI refuses as one chunk of a chunked body.
UPLOAD_CHUNK = 512 * 1024
#: Bytes read (or serialized) and hashed at a time, then sent as UPLOAD_CHUNK pieces.
READ_CHUNK = 8 * UPLOAD_CHUNK
#: Seconds to wait for a TCP connection to Glance, and for each answer (or for the
#: server to take more of the body) once connected.  A ``clouds.yaml`` ``api_timeout``
#: is used for both when the caller gives neither.
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 120.0


class Source:
    """The bytes to send: the file as it is, or its flattened chain."""

    def __init__(self, req: UploadRequest, disk_format: str) -> None:
        self.virtual_size: int
        #: The chain read (``flatten``), top first: ``(filename, format)`` pairs.
        self.chain: list[tuple[str, str]] = []
        if req.flatten:
            from qcowlib.ops.flatten import flatten_stream

            out = disk_format if disk_format in FLATTEN_TO else "qcow2"
            self._stream = flatten_stream(
                req.path,
                out,
                src_format=req.src_format,
                options=FLATTEN_TO.get(out),
                chunk_size=READ_CHUNK,
                backing_policy=req.backing_policy,
                force_share=req.force_share,
            )
            self.chain = self._stream.chain
            self.size = self._stream.size
            self.virtual_size = self._stream.virtual_size
            self._file: int | None = None
        else:
            from qcowlib.core.chain import as_policy
            from qcowlib.core.locks import take_read_locks
            from qcowlib.formats.opener import open_disk

            policy = as_policy(req.backing_policy, force_share=req.force_share)
            policy = policy._replace(follow=False)
            with open_disk(req.path, req.src_format, policy) as disk:
                self.virtual_size = disk.virtual_size
            try:
                self._file = os.open(req.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise QcowlibIOError(f"cannot open {req.path}: {exc.strerror}") from None
            try:  # held while it is sent: a VM cannot start writing it meanwhile
                take_read_locks(self._file, os.fspath(req.path), force_share=req.force_share)
            except BaseException:
                os.close(self._file)
                raise
            self.size = os.fstat(self._file).st_size

    def chunks(self) -> Iterator[bytes]:
        if self._file is None:
            yield from self._stream.chunks()
            return
        from qcowlib.core.hostfile import aligned_buffer

        # Read into an aligned buffer (the kernel's copy is much faster there), then hand
        # out a copy of it: the HTTP layer may hold on to what it is given.
        buf = aligned_buffer(READ_CHUNK)
        pos = 0
        while pos < self.size:
            n = min(READ_CHUNK, self.size - pos)
            try:
                got = os.preadv(self._file, [buf[:n]], pos)
            except OSError as exc:
                raise QcowlibIOError(f"read error: {exc.strerror}") from None
            if not got:
                raise QcowlibIOError("the file shrank while it was being uploaded")
            pos += got
            yield bytes(buf[:got])

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None
        else:
            self._stream.close()


class Sender:
    """The HTTP body: iterates the source, hashing every byte that goes out.

    Its length is the source's exact size, so the body goes with a ``Content-Length``,
    as openstacksdk sends a file, instead of chunked transfer encoding; a source that
    ends early or runs long raises instead of leaving the server waiting for bytes.
    Block N is hashed (md5, then sha512, in one helper thread) while it is being sent,
    so the socket does not go quiet for the hashing of every block.
    """

    def __init__(self, source: Source, progress: Progress | None) -> None:
        self.source = source
        self.hasher = MultiHasher(("md5", "sha512"), threads=False)
        self.sent = 0
        self.progress = progress
        self.error: BaseException | None = None

    def __len__(self) -> int:
        return self.source.size

    def __iter__(self) -> Iterator[bytes | memoryview]:
        pending: Future[None] | None = None
        size = self.source.size
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="qcowlib-upload-hash") as pool:
                for block in self.source.chunks():
                    if self.sent + len(block) > size:
                        raise UploadError(f"the image grew past the announced {size} bytes")
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(self.hasher.update, block)
                    # Sent in pieces (progress steps), views of the block: no copies.
                    view = memoryview(block)
                    for at in range(0, len(view), UPLOAD_CHUNK):
                        piece = view[at : at + UPLOAD_CHUNK]
                        self.sent += len(piece)
                        if self.progress:
                            self.progress(self.sent, size)
                        yield piece
                if pending is not None:
                    pending.result()
                if self.sent != size:
                    raise UploadError(f"the image ended after {self.sent} of {size} bytes")
        except BaseException as exc:  # surfaced after the HTTP layer gives up
            self.error = exc
            raise


def apply_timeouts(
    conn: Any, connect_timeout: float | None = None, read_timeout: float | None = None
) -> tuple[float, float]:
    """Give every request of ``conn`` (an openstacksdk Connection) a connect and a read
    timeout, in seconds; returns them.

    openstacksdk passes one number, ``api_timeout`` from ``clouds.yaml``, to its
    keystoneauth session, which hands it to ``requests``; ``requests`` also takes a
    ``(connect, read)`` pair, which is what is set here.  Unset values come from
    ``api_timeout``, else :data:`CONNECT_TIMEOUT` and :data:`READ_TIMEOUT`.
    """
    for value in (connect_timeout, read_timeout):
        if value is not None and not value > 0:
            raise InvalidArgument("timeouts must be positive numbers of seconds")
    session = getattr(conn, "session", None)
    configured = getattr(session, "timeout", None)
    if isinstance(configured, tuple):
        base_connect, base_read = configured
    elif configured:
        base_connect = base_read = float(configured)
    else:
        base_connect, base_read = CONNECT_TIMEOUT, READ_TIMEOUT
    pair = (
        float(connect_timeout) if connect_timeout is not None else float(base_connect),
        float(read_timeout) if read_timeout is not None else float(base_read),
    )
    if session is not None:
        session.timeout = pair
    return pair


def put_data(conn: Any, image: Any, body: Sender, size: int, store: str | None) -> None:
    """``PUT /v2/images/ID/file`` (openstacksdk's ``Image.upload``, plus the store header).

    The body is sized (``Content-Length``); ``X-OpenStack-Image-Size`` announces the size,
    which Glance enforces, and ``X-Image-Meta-Store`` picks the store.
    """
    from openstack import exceptions as os_exc

    headers = {
        "Content-Type": "application/octet-stream",
        "Accept": "",
        "X-OpenStack-Image-Size": str(size),
    }
    if store is not None:
        headers["X-Image-Meta-Store"] = store
    response = conn.image.put(f"/images/{image.id}/file", data=body, headers=headers)
    os_exc.raise_from_response(response)
