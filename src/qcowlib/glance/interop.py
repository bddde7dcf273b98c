"""Glance's interoperable image import (``--import``) and multi-store checks (``--store``).

Import is two steps: the bytes go to Glance's staging area (``PUT /v2/images/ID/stage``),
then ``POST /v2/images/ID/import`` with method ``glance-direct`` (and the target
``stores``) starts a task that copies them into the store, hashing them on the way.
openstacksdk's ``import_image`` returns an error response instead of raising, so its
status is checked here; and a failed import leaves the image in ``importing`` (or back in
``queued``) with the store named in ``os_glance_failed_import``, so polling watches that
property, not only ``status``.  The reason is the import task's message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from qcowlib._log import get_logger
from qcowlib.errors import QcowlibError

log = get_logger(__name__)

#: How long an import may take after the data is staged (Glance copies it into the store).
IMPORT_TIMEOUT = 3600.0
#: First and longest pause between two looks at an importing image.
POLL_FIRST = 0.2
POLL_MAX = 5.0
#: How long to wait for a failed import's task to end, for its message.
TASK_SETTLE = 10.0
#: Statuses from which an image never goes active by itself.
_DEAD = frozenset({"killed", "deleted", "pending_delete", "deactivated"})


class ImportFailed(QcowlibError):
    """Glance refused the import request, or its import task failed or did not finish."""


def check_store(conn: Any, store: str) -> None:
    """Fail (before any image exists) unless ``store`` is one of the cloud's stores."""
    try:
        stores = list(conn.image.stores())
    except Exception as exc:
        raise ImportFailed(
            f"--store {store}: the cloud does not list its stores ({describe(exc)}); "
            "--store needs Glance with multiple stores (enabled_backends)"
        ) from None
    ids = [s.id for s in stores]
    if store not in ids:
        have = ", ".join(f"{s.id} (default)" if s.is_default else str(s.id) for s in stores)
        raise ImportFailed(f"--store {store}: no such store in this cloud (it has {have})")


def check_glance_direct(conn: Any) -> None:
    """Fail (before any image exists) unless the cloud offers ``glance-direct`` import."""
    try:
        info = conn.image.get_import_info()
        methods = list((info.import_methods or {}).get("value") or [])
    except Exception as exc:
        raise ImportFailed(
            f"--import: cannot ask Glance for its import methods: {describe(exc)}"
        ) from None
    if "glance-direct" not in methods:
        offered = ", ".join(methods) or "none"
        raise ImportFailed(
            f"--import: this cloud does not offer glance-direct import (it offers {offered}); "
            "upload without --import"
        )


def stage_and_import(
    conn: Any,
    image: Any,
    body: Any,
    size: int,
    store: str | None,
    *,
    timeout: float = IMPORT_TIMEOUT,
) -> Any:
    """Stage ``body`` (``size`` bytes) for ``image``, import it, wait; the final record."""
    image.stage(conn.image, data=body, size=size)  # raises on an HTTP error status
    from openstack import exceptions as os_exc
    from openstack.image.v2.service_info import Store

    stores = [Store(id=store)] if store else None
    response = image.import_image(conn.image, "glance-direct", stores=stores)
    try:
        os_exc.raise_from_response(response)  # import_image does not raise by itself
    except os_exc.HttpException as exc:
        raise ImportFailed(f"Glance refused the import request: {describe(exc)}") from None
    return wait_for_import(conn, image.id, timeout=timeout)


def wait_for_import(
    conn: Any,
    image_id: str,
    *,
    timeout: float = IMPORT_TIMEOUT,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """Poll until the image is ``active`` with no store still importing; the record.

    Raises :class:`ImportFailed` when ``os_glance_failed_import`` names a store (with the
    import task's message), when the image reaches a status it cannot leave, or after
    ``timeout`` seconds.
    """
    deadline = clock() + timeout
    delay = POLL_FIRST
    while True:
        record = conn.image.get_image(image_id)
        props = record.properties or {}
        failed = _store_list(props.get("os_glance_failed_import"))
        if failed:
            reason = task_message(conn, image_id, clock=clock, sleep=sleep)
            because = f": {reason}" if reason else ""
            raise ImportFailed(f"Glance's import into store {', '.join(failed)} failed{because}")
        importing = _store_list(props.get("os_glance_importing_to_stores"))
        if record.status == "active" and not importing:
            return record
        if record.status in _DEAD:
            raise ImportFailed(f"the image went {record.status!r} while importing")
        if clock() >= deadline:
            raise ImportFailed(
                f"the import did not finish within {timeout:.0f} s (image status {record.status!r})"
            )
        sleep(delay)
        delay = min(delay * 1.5, POLL_MAX)


def task_message(
    conn: Any,
    image_id: str,
    *,
    settle: float = TASK_SETTLE,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """The message of the image's failed import task ('' when there is none to read).

    Glance marks the store failed before the task itself ends (its message then is
    still progress, ``Copied 0 MiB``): wait up to ``settle`` seconds for a failed task.
    """
    deadline = clock() + settle
    while True:
        try:
            tasks = list(conn.image.image_tasks(image_id))
        except Exception:  # older Glance (no /images/ID/tasks) or a policy that hides tasks
            log.debug("cannot list the tasks of image %s", image_id, exc_info=True)
            return ""
        tasks.sort(key=lambda t: str(t.created_at or ""))
        failed = [t for t in tasks if t.status == "failure" and t.message]
        if failed:
            return " ".join(str(failed[-1].message).split())
        if clock() >= deadline:
            return ""
        sleep(POLL_FIRST)


def _store_list(value: object) -> list[str]:
    if not value:
        return []
    return [s.strip() for s in str(value).split(",") if s.strip()]


def describe(exc: BaseException) -> str:
    """One line for an openstacksdk/keystoneauth error: Glance's own words, no SDK dump.

    An HTTP error becomes ``MESSAGE (HTTP CODE)`` with the message Glance sent; a
    connection failure names the endpoint that could not be reached.
    """
    if isinstance(exc, QcowlibError):
        return str(exc)
    status = getattr(exc, "status_code", None)
    if status is not None:
        details = _body_message(getattr(exc, "response", None)) or _strip_sdk_prefix(
            _clean(getattr(exc, "details", None)) or _clean(getattr(exc, "message", None))
        )
        return f"{details} (HTTP {status})" if details else f"HTTP {status}"
    name = type(exc).__name__
    text = _first_line(exc)
    url = getattr(exc, "url", None) or _url_in(text)
    if name == "EndpointNotFound":
        return f"the cloud's catalog has no image endpoint: {text}"
    if name == "DiscoveryFailure" and url:
        return (
            f"cannot reach Glance at {url.rstrip(',')} (no API version document there: "
            "the service is down or the endpoint is wrong)"
        )
    if name in ("ConnectFailure", "ConnectionError", "ConnectTimeout"):
        return f"cannot connect to {url}" if url else f"cannot connect: {text}"
    return text


def _body_message(response: Any) -> str:
    """Glance's own message in an error body: its last line that is not the status.

    Glance's errors are webob pages (plain text or HTML): the status (``415 Unsupported
    Media Type``), webob's generic explanation, then Glance's detail (``Image failed
    safety checks``); JSON bodies carry ``message``.
    """
    import html
    import re

    try:
        text = str(response.text or "")
        status = f"{response.status_code} {response.reason}"
    except Exception:  # no response, or one that cannot be decoded
        return ""
    if text.lstrip().startswith("{"):
        try:
            import json

            body = json.loads(text)
            for value in (body, *(v for v in body.values() if isinstance(v, dict))):
                if isinstance(value, dict) and value.get("message"):
                    return " ".join(str(value["message"]).split())
        except (ValueError, AttributeError):
            pass
    text = re.sub(r"<br\s*/?>", "\n", text)
    text = html.unescape(re.sub(r"<[^>]+>", "\n", text))
    lines = [" ".join(line.split()) for line in text.splitlines()]
    lines = [line for line in lines if line and line != status]
    return lines[-1] if lines else ""


def _clean(value: object) -> str:
    if not value:
        return ""
    import re

    text = re.sub(r"<[^>]+>", " ", str(value))
    text = " ".join(text.split())
    # webob error pages repeat the status as a title: "409 Conflict 409 Conflict MESSAGE"
    m = re.match(r"^(\d{3} [A-Za-z ]+?) \1 (.*)$", text)
    return m.group(2) if m else text


def _strip_sdk_prefix(text: str) -> str:
    import re

    # "Client Error for url: http://..., MESSAGE" -> MESSAGE
    m = re.match(r"^(?:Client|Server) Error for url: \S+?, (.*)$", text)
    return m.group(1) if m else text


def _url_in(text: str) -> str | None:
    import re

    m = re.search(r"https?://[^\s:,]+(?::\d+)?[^\s:,]*", text)
    return m.group(0) if m else None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
