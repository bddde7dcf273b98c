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
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from qcowlib._log import get_logger
from qcowlib.errors import InvalidArgument, QcowlibError
from qcowlib.formats import registry
from qcowlib.glance.request import (
    FLATTEN_TO,
    UploadError,
    UploadRequest,
    UploadResult,
    ValidationRefused,
)
from qcowlib.glance.transfer import (
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    Progress,
    Sender,
    Source,
    apply_timeouts,
    put_data,
)
from qcowlib.glance.verify import disagreements, summary

if TYPE_CHECKING:
    from openstack.connection import Connection

__all__ = ["UploadRequest", "upload"]

log = get_logger(__name__)
GiB = 1 << 30


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
    req.check()
    disk_format = _disk_format(req)
    errors = _validate(req, disk_format)
    if errors and not req.force:
        raise ValidationRefused(
            "validation refused the image: " + "; ".join(e["message"] for e in errors), errors
        )
    source = Source(req, disk_format)  # opens a flattened chain's base files too
    if on_chain is not None and source.chain:
        on_chain(source.chain)
    try:
        conn = _connection(cloud, connection, connect)
        timeouts = apply_timeouts(conn, connect_timeout, read_timeout)
        return _send(conn, req, disk_format, source, progress, timeouts, forced=errors)
    finally:
        source.close()


def _disk_format(req: UploadRequest) -> str:
    """The ``disk_format`` to declare: the one asked for, else what flatten writes, else
    Glance's name for the format the file is."""
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
    return req.disk_format or ("qcow2" if req.flatten else registry.glance_disk_format(detected))


def _connection(
    cloud: str | None, connection: Connection | None, connect: Callable[[], Connection] | None
) -> Connection:
    """The connection given, or made by ``connect``, or from the cloud configuration."""
    if connection is not None:
        return connection
    if connect is not None:
        return connect()
    from qcowlib.glance.cloud import connect as cloud_connect

    made: Connection = cloud_connect(cloud=cloud)
    return made


def _image_attributes(req: UploadRequest, source: Source) -> dict[str, Any]:
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
    source: Source,
    progress: Progress | None,
    timeouts: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT),
    forced: list[dict[str, Any]] | None = None,
) -> UploadResult:
    from openstack.image.v2 import image as _image

    from qcowlib.glance import interop

    sender = Sender(source, progress)
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
            put_data(conn, image, sender, source.size, req.store)
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
    problems = disagreements(record, sender.sent, source.size, digests, req.store)
    if problems:
        done = _cleanup(conn, image_id)
        raise UploadError("upload not accepted: " + "; ".join(problems) + f" ({done})")
    return summary(record, sender.sent, digests)


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
