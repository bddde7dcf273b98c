"""Streamed upload to Glance with checksums both sides agree on.

The image is validated first (``glance`` policy), then sent as a stream of chunks under
1 MiB with its size announced up front (``X-OpenStack-Image-Size``, which Glance
enforces), hashed with md5 and sha512 as the bytes go out.  Afterwards the image must be
``active`` with Glance's ``checksum`` and ``os_hash_value`` equal to ours; on any
failure or mismatch the Glance image is deleted.  An overlay is refused with advice, or
flattened on the fly with ``flatten=True`` (no temporary file).

Everything that can be checked locally (the file, its validation, a flattened chain's
base files, the request's own values) is checked before the cloud is configured and
before any network request.  With ``use_import=True`` the bytes are staged and imported
(interoperable import, :mod:`qcowlib.glance.interop`); ``store`` picks one store of a
multi-store Glance.  Cloud configuration comes from :mod:`qcowlib.glance.cloud`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from qcowlib._log import get_logger
from qcowlib.core.digest import MultiHasher
from qcowlib.errors import InvalidArgument, QcowlibError, QcowlibIOError
from qcowlib.formats import registry

if TYPE_CHECKING:
    from openstack.connection import Connection

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


class _Source:
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


def _validate(req: UploadRequest, disk_format: str) -> list[dict[str, Any]]:
    from qcowlib.validate import validate

    # Glance inspects only bare containers; what is inside another container (an OVA's
    # tar, a kernel) is not checked against disk_format, but a disk image qcowlib
    # recognises in the file is still checked for what makes it unsafe.
    declared = disk_format if req.container_format == "bare" else None
    report = validate(req.path, "glance", declared, fmt=req.src_format)
    errors = []
    for f in report.findings:
        if req.flatten and ("backing" in f.rule or f.rule == "format-match"):
            continue  # flattening removes the backing file and writes the declared format
        if f.severity == "error":
            errors.append(f.to_json())
        else:  # shown (on stderr from the command line) before anything is sent
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
    connection: Connection | None = None,
    connect: Callable[[], Connection] | None = None,
    progress: Progress | None = None,
    on_chain: Callable[[Sequence[tuple[str, str]]], None] | None = None,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
) -> UploadResult:
    """Upload ``req.path`` to Glance; returns the contract's summary of the image.

    The summary has Glance's ``id``, ``name``, ``status``, ``disk_format``, ``size``,
    ``virtual_size``, ``checksum``, ``os_hash_algo``, ``os_hash_value`` and, beside them,
    ``container_format``, ``visibility``, ``protected``, ``tags``, ``stores`` and
    ``computed`` (``size``, ``md5`` and ``sha512`` of the bytes sent, computed here).

    Raises :class:`InvalidArgument` for a request Glance would refuse and
    :class:`ValidationRefused` when validation finds errors and ``req.force`` is not set
    (nothing sent, no cloud contacted), :class:`~qcowlib.glance.cloud.CloudConfigError`
    when no cloud is configured, and :class:`UploadError` when the upload or import
    fails or Glance's record disagrees (the image is deleted first).  ``connection`` is
    an ``openstack.connection.Connection`` to use; ``connect`` a function that makes one,
    called only after the local checks passed; otherwise one is built from ``cloud``
    (or ``OS_CLOUD``, clouds.yaml and ``OS_*`` variables, as the ``openstack`` client
    does).
    With ``req.flatten``, ``on_chain`` is told the chain read, top first, as
    ``(filename, format)`` pairs.  ``connect_timeout`` and ``read_timeout`` (seconds)
    bound every request (:func:`apply_timeouts`): a Glance that accepts the connection
    and never answers ends in :class:`UploadError`.  Validation warnings are logged
    before anything is sent.  Interrupted (Ctrl-C, or a signal the command line turns
    into :class:`~qcowlib.core.interrupt.Interrupted`), the upload deletes the image it
    created and re-raises, with what it did in the exception's ``detail``.
    """
    from qcowlib.core.hostfile import HostFile
    from qcowlib.formats.opener import probe_format

    req.check()
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
    errors = _validate(req, disk_format)
    if errors and not req.force:
        raise ValidationRefused(
            "validation refused the image: " + "; ".join(e["message"] for e in errors), errors
        )
    source = _Source(req, disk_format)  # opens a flattened chain's base files too
    if on_chain is not None and source.chain:
        on_chain(source.chain)
    try:
        if connection is not None:
            conn = connection
        elif connect is not None:
            conn = connect()
        else:
            from qcowlib.glance.cloud import connect as cloud_connect

            conn = cloud_connect(cloud=cloud)
        timeouts = apply_timeouts(conn, connect_timeout, read_timeout)
        return _send(conn, req, disk_format, source, progress, timeouts, forced=errors)
    finally:
        source.close()


def _image_attributes(req: UploadRequest, source: _Source) -> dict[str, Any]:
    """The image record's attributes, as openstacksdk's ``Image`` spells them."""
    kwargs: dict[str, Any] = dict(req.properties)
    if req.min_disk is not None:
        kwargs["min_disk"] = req.min_disk
    elif req.container_format == "bare":  # else the file's size says nothing of the disk's
        kwargs["min_disk"] = math.ceil(source.virtual_size / GiB)
    if req.min_ram is not None:
        kwargs["min_ram"] = req.min_ram
    if req.visibility is not None:
        kwargs["visibility"] = req.visibility
    if req.protected:
        kwargs["is_protected"] = True
    if req.tags:
        kwargs["tags"] = list(dict.fromkeys(req.tags))
    return kwargs


def _send(
    conn: Any,
    req: UploadRequest,
    disk_format: str,
    source: _Source,
    progress: Progress | None,
    timeouts: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT),
    forced: list[dict[str, Any]] | None = None,
) -> UploadResult:
    from openstack.image.v2 import image as _image

    from qcowlib.glance import interop

    sender = _Sender(source, progress)
    kwargs = _image_attributes(req, source)
    image_id: str | None = None
    # When the current request started (None while the body is sent, which takes as
    # long as it takes): a request failing after waiting a timeout's length timed out,
    # whatever keystoneauth calls it.
    started: float | None = time.monotonic()
    try:
        # Requests that need no image first: a wrong --store or a cloud without
        # glance-direct is reported before a record exists.
        if req.store is not None:
            interop.check_store(conn, req.store)
        if req.use_import:
            interop.check_glance_direct(conn)
        # The record first, so that its id is known and it can be deleted on failure.
        image = _image.Image.new(
            name=req.name,
            disk_format=disk_format,
            container_format=req.container_format,
            **kwargs,
        ).create(conn.image)
        image_id = image.id
        started = None
        if req.use_import:
            record = interop.stage_and_import(conn, image, sender, source.size, req.store)
        else:
            _put_data(conn, image, sender, source.size, req.store)
            started = time.monotonic()
            record = conn.image.get_image(image_id)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP (core/interrupt.py)
        exc.detail = _cleanup(conn, image_id)  # type: ignore[attr-defined]
        raise
    except Exception as exc:
        waited = 0.0 if started is None else time.monotonic() - started
        done = _cleanup(conn, image_id)
        if sender.error is not None and isinstance(sender.error, QcowlibError):
            sender.error.message += f" ({done})"
            raise sender.error from None
        why = _why(exc, forced) + _timed_out(exc, timeouts, waited)
        raise UploadError(f"upload failed: {why} ({done})") from None
    digests = sender.hasher.hexdigests()
    sender.hasher.close()
    problems = _disagreements(record, sender, source, digests, req.store)
    if problems:
        done = _cleanup(conn, image_id)
        raise UploadError("upload not accepted: " + "; ".join(problems) + f" ({done})")
    return _summary(record, sender.sent, digests)


def _summary(record: Any, sent: int, digests: dict[str, str]) -> UploadResult:
    """The contract's keys as Glance reports them, then ours beside them."""
    props = record.properties or {}
    stores = [s for s in str(props.get("stores") or "").split(",") if s]
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
        "container_format": record.container_format,
        "visibility": record.visibility,
        "protected": bool(record.is_protected),
        "tags": sorted(record.tags or []),
        "stores": stores,
        "computed": {"size": sent, "md5": digests["md5"], "sha512": digests["sha512"]},
    }


def _put_data(conn: Any, image: Any, body: _Sender, size: int, store: str | None) -> None:
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


def _disagreements(
    record: Any, sender: _Sender, source: _Source, digests: dict[str, str], store: str | None
) -> list[str]:
    """What in Glance's record differs from what was sent ([] when all agree)."""
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
    stores = str((record.properties or {}).get("stores") or "").split(",")
    if store is not None and store not in stores:
        problems.append(f"Glance stored the image in {','.join(stores)!r}, not in {store!r}")
    return problems


def _why(exc: BaseException, forced: list[dict[str, Any]] | None) -> str:
    """Why the upload failed, in Glance's words; after --force, what was overridden."""
    from qcowlib.glance.interop import describe

    text = describe(exc)
    if forced:
        rules = ", ".join(dict.fromkeys(f["rule"] for f in forced))
        text += f"; it was sent with --force despite validation errors ({rules})"
    return text


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
        return f"Glance image deleted: {image_id}"


def _timed_out(exc: BaseException, timeouts: tuple[float, float], waited: float) -> str:
    """For a timeout (keystoneauth says "timed out", or hides it in a failed version
    discovery after waiting that long), which one; else nothing."""
    if "timed out" not in str(exc).lower() and waited < min(timeouts):
        return ""
    return (
        f" (Glance did not answer within the timeouts: connect {timeouts[0]:g} s, "
        f"read {timeouts[1]:g} s; see --connect-timeout and --read-timeout)"
    )


def _describe(exc: BaseException) -> str:
    from qcowlib.glance.interop import describe

    return describe(exc)


def parse_properties(items: list[str]) -> Mapping[str, str]:
    """``K=V`` strings to a mapping (``--property`` may repeat)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"property {item!r} is not KEY=VALUE")
        out[key] = value
    return out
