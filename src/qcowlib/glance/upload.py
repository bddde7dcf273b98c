"""Streamed upload to Glance with checksums both sides agree on.

The image is validated first (``glance`` policy), then sent as a stream of chunks under
1 MiB with its size announced up front (``X-OpenStack-Image-Size``, which Glance
enforces), hashed with md5 and sha512 as the bytes go out.  Afterwards the image must be
``active`` with Glance's ``checksum`` and ``os_hash_value`` equal to ours; on any
failure or mismatch the Glance image is deleted.  An overlay is refused with advice, or
flattened on the fly with ``flatten=True`` (no temporary file).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from qcowlib._log import get_logger
from qcowlib.core.digest import MultiHasher
from qcowlib.errors import InvalidArgument, QcowlibError, QcowlibIOError
from qcowlib.formats import registry

log = get_logger(__name__)

Progress = Callable[[int, int], None]
#: Pieces handed to the HTTP layer (and progress steps); also under the 1,048,568 bytes
#: that Glance behind uWSGI refuses as one chunk of a chunked body.
UPLOAD_CHUNK = 512 * 1024
#: Bytes read (or serialized) and hashed at a time, then sent as UPLOAD_CHUNK pieces.
READ_CHUNK = 8 * UPLOAD_CHUNK
GiB = 1 << 30
#: Seconds to wait for a TCP connection to Glance, and for each answer (or for the
#: server to take more of the body) once connected.  A ``clouds.yaml`` ``api_timeout``
#: is used for both when the caller gives neither.
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 120.0
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


@dataclass
class UploadRequest:
    """What to upload and the image properties to set (``glance image-create`` options)."""

    path: str
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


class _Source:
    """The bytes to send: the file as it is, or its flattened chain."""

    def __init__(self, req: UploadRequest, disk_format: str) -> None:
        self.virtual_size: int
        if req.flatten:
            from qcowlib.ops.flatten import flatten_stream

            out = disk_format if disk_format in FLATTEN_TO else "qcow2"
            self._stream = flatten_stream(
                req.path,
                out,
                src_format=req.src_format,
                options=FLATTEN_TO.get(out),
                chunk_size=READ_CHUNK,
            )
            self.size = self._stream.size
            self.virtual_size = self._stream.virtual_size
            self._file: int | None = None
        else:
            from qcowlib.core.chain import BackingPolicy
            from qcowlib.formats.opener import open_disk

            with open_disk(req.path, req.src_format, BackingPolicy(follow=False)) as disk:
                self.virtual_size = disk.virtual_size
            try:
                self._file = os.open(req.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise QcowlibIOError(f"cannot open {req.path}: {exc.strerror}") from None
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


class _Sender:
    """The HTTP body: iterates the source, hashing every byte that goes out.

    Its length is the source's exact size, so the body goes with a ``Content-Length``,
    as openstacksdk sends a file, instead of chunked transfer encoding; a source that
    ends early or runs long raises instead of leaving the server waiting for bytes.
    Block N is hashed (md5, then sha512, in one helper thread) while it is being sent,
    so the socket does not go quiet for the hashing of every block.
    """

    def __init__(self, source: _Source, progress: Progress | None) -> None:
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


def _connect(cloud: str | None) -> Any:
    try:
        import openstack
    except ImportError:
        raise InvalidArgument("upload needs openstacksdk: pip install 'qcowlib[glance]'") from None
    try:
        return openstack.connect(cloud=cloud) if cloud else openstack.connect()
    except Exception as exc:  # openstacksdk raises many types for bad cloud config
        raise UploadError(f"cannot configure the cloud connection: {exc}") from None


def _validate(req: UploadRequest, disk_format: str) -> list[dict[str, Any]]:
    """Validation errors that stop the upload; warnings are logged (on stderr from the
    command line) before anything is sent."""
    from qcowlib.validate import validate

    report = validate(req.path, "glance", disk_format, fmt=req.src_format)
    errors = []
    for f in report.findings:
        if req.flatten and ("backing" in f.rule or f.rule == "format-match"):
            continue  # flattening removes the backing file and writes the declared format
        if f.severity == "error":
            errors.append(f.to_json())
        else:
            log.warning("%s: [%s] %s", req.path, f.rule, f.message)
    return errors


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


def upload(
    req: UploadRequest,
    *,
    cloud: str | None = None,
    connection: Any = None,
    progress: Progress | None = None,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
) -> dict[str, Any]:
    """Upload ``req.path`` to Glance; returns the contract's summary of the image.

    Raises :class:`ValidationRefused` (nothing sent) when validation finds errors and
    ``req.force`` is not set, and :class:`UploadError` when the upload fails or Glance's
    record disagrees (the image is deleted first).  ``connection`` is an
    ``openstack.connection.Connection`` to use instead of one built from ``cloud``
    (``--os-cloud``, ``OS_CLOUD``, clouds.yaml and ``OS_*`` variables, as the
    ``openstack`` client does).  ``connect_timeout`` and ``read_timeout`` (seconds)
    bound every request (:func:`apply_timeouts`): a Glance that accepts the connection
    and never answers ends in :class:`UploadError`.  Validation warnings are logged
    before anything is sent.  Interrupted (Ctrl-C, or a signal the command line turns
    into :class:`~qcowlib.core.interrupt.Interrupted`), the upload deletes the image it
    created and re-raises, with what it did in the exception's ``detail``.
    """
    from qcowlib.core.hostfile import HostFile
    from qcowlib.formats.opener import probe_format

    host = HostFile(req.path)
    try:
        detected = probe_format(host)
    finally:
        host.close()
    if req.flatten and req.disk_format not in (None, *FLATTEN_TO):
        raise InvalidArgument(
            f"--flatten writes {', '.join(FLATTEN_TO)}: use --disk-format with one of them"
        )
    disk_format = req.disk_format or (
        "qcow2" if req.flatten else registry.glance_disk_format(detected)
    )
    if req.container_format != "bare":
        raise InvalidArgument("only container_format bare is supported")
    errors = _validate(req, disk_format)
    if errors and not req.force:
        raise ValidationRefused(
            "validation refused the image: " + "; ".join(e["message"] for e in errors), errors
        )
    conn = connection if connection is not None else _connect(cloud)
    timeouts = apply_timeouts(conn, connect_timeout, read_timeout)
    source = _Source(req, disk_format)
    try:
        return _send(conn, req, disk_format, source, progress, timeouts)
    finally:
        source.close()


def _send(
    conn: Any,
    req: UploadRequest,
    disk_format: str,
    source: _Source,
    progress: Progress | None,
    timeouts: tuple[float, float],
) -> dict[str, Any]:
    sender = _Sender(source, progress)
    min_disk = req.min_disk if req.min_disk is not None else math.ceil(source.virtual_size / GiB)
    kwargs: dict[str, Any] = dict(req.properties)
    kwargs["min_disk"] = min_disk
    if req.min_ram is not None:
        kwargs["min_ram"] = req.min_ram
    if req.visibility is not None:
        kwargs["visibility"] = req.visibility
    if req.protected:
        kwargs["is_protected"] = True
    from openstack import exceptions as os_exc
    from openstack.image.v2 import image as _image

    image_id: str | None = None
    # When the current request started (None while the body is sent, which takes
    # as long as it takes): a request failing after waiting a timeout's length
    # timed out, whatever keystoneauth calls it.
    started: float | None = time.monotonic()
    try:
        # The record first, so that its id is known and it can be deleted on failure.
        image = _image.Image.new(
            name=req.name,
            disk_format=disk_format,
            container_format=req.container_format,
            **kwargs,
        ).create(conn.image)
        image_id = image.id
        image.data = sender  # sized: sent with a Content-Length
        started = None
        response = image.upload(conn.image, size=source.size)
        started = time.monotonic()
        os_exc.raise_from_response(response)
        record = conn.image.get_image(image_id)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP (core/interrupt.py)
        exc.detail = _cleanup(conn, image_id)  # type: ignore[attr-defined]
        raise
    except Exception as exc:
        waited = 0.0 if started is None else time.monotonic() - started
        done = _cleanup(conn, image_id)
        if sender.error is not None and isinstance(sender.error, QcowlibError):
            raise UploadError(f"upload failed: {sender.error} ({done})") from None
        raise UploadError(f"upload failed: {_describe(exc, timeouts, waited)} ({done})") from None
    digests = sender.hasher.hexdigests()
    sender.hasher.close()
    problems = []
    if record.status != "active":
        problems.append(f"image status is {record.status!r}, not 'active'")
    if sender.sent != source.size:
        problems.append(f"sent {sender.sent} bytes, announced {source.size}")
    if record.size is not None and record.size != source.size:
        problems.append(f"Glance stored {record.size} bytes, we sent {source.size}")
    if record.checksum != digests["md5"]:
        problems.append(f"checksum {record.checksum} differs from ours {digests['md5']}")
    algo = record.hash_algo or "sha512"
    if algo == "sha512" and record.hash_value != digests["sha512"]:
        problems.append("os_hash_value differs from our sha512")
    elif algo != "sha512":
        problems.append(f"Glance hashes with {algo}; cannot verify os_hash_value")
    if problems:
        done = _cleanup(conn, image_id)
        raise UploadError("upload not accepted: " + "; ".join(problems) + f" ({done})")
    return {
        "id": record.id,
        "name": record.name,
        "status": record.status,
        "disk_format": record.disk_format,
        "size": record.size,
        "virtual_size": record.virtual_size,
        "checksum": record.checksum,
        "os_hash_algo": record.hash_algo,
        "os_hash_value": record.hash_value,
    }


def _cleanup(conn: Any, image_id: str | None) -> str:
    """Delete the image this upload created; says what happened, naming the image.

    Runs to its end even when signals arrive meanwhile (they are recorded, see
    :mod:`qcowlib.core.interrupt`); each request is bounded by the timeouts.
    """
    from qcowlib.core import interrupt

    if image_id is None:
        return "no image was created"
    with interrupt.deferred():
        try:
            if conn.image.find_image(image_id) is not None:
                conn.image.update_image(image_id, is_protected=False)
                conn.image.delete_image(image_id, ignore_missing=True)
        except Exception as exc:  # report the original problem; say this one too
            log.debug("deleting image %s", image_id, exc_info=True)
            return (
                f"Glance image {image_id} could NOT be deleted: {_describe(exc)}; "
                f"delete it with: openstack image delete {image_id}"
            )
        return f"Glance image {image_id} deleted"


def _describe(
    exc: BaseException, timeouts: tuple[float, float] | None = None, waited: float = 0.0
) -> str:
    """The first line of an error; for a timeout (keystoneauth says "timed out", or
    hides it in a failed version discovery after waiting that long), which one."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    if timeouts is not None and ("timed out" in first.lower() or waited >= min(timeouts)):
        first += (
            f" (Glance did not answer within the timeouts: connect {timeouts[0]:g} s, "
            f"read {timeouts[1]:g} s; see --connect-timeout and --read-timeout)"
        )
    return first


def parse_properties(items: list[str]) -> Mapping[str, str]:
    """``K=V`` strings to a mapping (``--property`` may repeat)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"property {item!r} is not KEY=VALUE")
        out[key] = value
    return out
