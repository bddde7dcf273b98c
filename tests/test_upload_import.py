"""``qcowlib upload --import``: interoperable import (stage + glance-direct) into a real
Glance that trusts identity headers (tests/glance_server.py, ``context`` pipeline, with
two filesystem stores), and the polling that watches ``os_glance_failed_import``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qcowlib.cli import main
from qcowlib.glance import interop, request
from qcowlib.glance import upload as up
from qcowlib.ops.flatten import flatten
from tests.conftest import qemu_img, require_qemu
from tests.glance_server import GlanceServer

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:openstack")


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    require_qemu()
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x3c 0 1M", str(base)], check=True, capture_output=True
    )
    top = tmp_path / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    subprocess.run(
        ["qemu-io", "-c", "write -P 0xc3 512k 1M", str(top)], check=True, capture_output=True
    )
    return top


def images_named(server: GlanceServer, name: str) -> list[Any]:
    return [i for i in server.connection().image.images() if i.name == name]


def download(server: GlanceServer, image_id: str, path: Path) -> bytes:
    with path.open("wb") as f:
        for piece in (
            server.connection().image.download_image(image_id, stream=True).iter_content(1 << 20)
        ):
            f.write(piece)
    return path.read_bytes()


def test_flattened_overlay_imported(
    glance_context_server: GlanceServer, chain: Path, tmp_path: Path
) -> None:
    server = glance_context_server
    req = up.UploadRequest(path=str(chain), name="imp-flat", flatten=True, use_import=True)
    out = up.upload(req, connection=server.connection())
    assert out["status"] == "active" and out["stores"] == ["fs"]
    flat = tmp_path / "flat.qcow2"
    flatten(str(chain), str(flat))
    data = flat.read_bytes()
    assert out["checksum"] == hashlib.md5(data).hexdigest() == out["computed"]["md5"]
    assert out["os_hash_value"] == hashlib.sha512(data).hexdigest()
    got = download(server, out["id"], tmp_path / "down.qcow2")
    assert got == data
    assert qemu_img("compare", chain, tmp_path / "down.qcow2").returncode == 0
    record = server.connection().image.get_image(out["id"])
    assert record.owner == server.project_id and record.min_disk == 1


def test_cli_import_into_a_store(
    glance_context_server: GlanceServer,
    chain: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The command line's --import --store --tag --private reach Glance's record (the
    connection is the fixture's: clouds.yaml cannot carry the identity headers)."""
    server = glance_context_server
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("qcowlib.glance.cloud.connect", lambda *a, **k: server.connection())
    base = chain.parent / "base.qcow2"
    status = main(
        ["upload", "--name", "imp-cli", "--import", "--store", "fs2", "--tag", "imported",
         "--private", "--min-ram", "256", "--output", "json", str(base)]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0, captured.err
    out = json.loads(captured.out)
    assert out["stores"] == ["fs2"] and out["tags"] == ["imported"]
    assert out["visibility"] == "private"
    stored = server.workdir / "images2" / out["id"]
    assert stored.read_bytes() == base.read_bytes()
    assert out["computed"]["sha512"] == hashlib.sha512(base.read_bytes()).hexdigest()
    record = server.connection().image.get_image(out["id"])
    assert record.min_ram == 256 and record.properties["stores"] == "fs2"


def test_failed_import_is_reported_and_deleted(
    glance_context_server: GlanceServer, chain: Path
) -> None:
    """A forced overlay: staging accepts it, Glance's import task refuses it.  The image
    stays 'importing' with os_glance_failed_import set; that ends the wait, with the
    task's message, and the image is deleted."""
    server = glance_context_server
    req = up.UploadRequest(path=str(chain), name="imp-bad", force=True, use_import=True)
    with pytest.raises(request.UploadError) as caught:
        up.upload(req, connection=server.connection())
    message = str(caught.value)
    assert "Glance's import into store fs failed: Task failed" in message, message
    assert "image deleted" in message and "--force" in message
    assert images_named(server, "imp-bad") == []


def test_import_unknown_store(glance_context_server: GlanceServer, chain: Path) -> None:
    req = up.UploadRequest(
        path=str(chain.parent / "base.qcow2"), name="imp-nostore", use_import=True, store="x"
    )
    with pytest.raises(request.UploadError, match=r"no such store in this cloud \(it has fs"):
        up.upload(req, connection=glance_context_server.connection())
    assert images_named(glance_context_server, "imp-nostore") == []


# -- polling, without a server ------------------------------------------------------------


@dataclass
class _Record:
    status: str
    properties: dict[str, str] = field(default_factory=dict)


@dataclass
class _Task:
    message: str
    created_at: str
    status: str = "failure"


class _FakeImages:
    """conn.image for wait_for_import: returns the given records in turn."""

    def __init__(self, records: list[_Record], tasks: list[_Task] | None = None) -> None:
        self.records = records
        self.tasks = tasks or []
        self.looks = 0

    def get_image(self, image_id: str) -> _Record:
        record = self.records[min(self.looks, len(self.records) - 1)]
        self.looks += 1
        return record

    def image_tasks(self, image_id: str) -> list[_Task]:
        return self.tasks


class _Conn:
    def __init__(self, images: Any) -> None:
        self.image = images


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _wait(images: _FakeImages, timeout: float = 60.0) -> tuple[Any, _Clock]:
    clock = _Clock()
    record = interop.wait_for_import(
        _Conn(images), "id", timeout=timeout, clock=clock, sleep=clock.sleep
    )
    return record, clock


def test_wait_until_active_and_no_store_importing() -> None:
    images = _FakeImages(
        [
            _Record("uploading"),
            _Record("importing", {"os_glance_importing_to_stores": "fs"}),
            _Record("active", {"os_glance_importing_to_stores": "fs2"}),
            _Record("active", {"os_glance_importing_to_stores": "", "stores": "fs,fs2"}),
        ]
    )
    record, clock = _wait(images)
    assert record.properties["stores"] == "fs,fs2" and images.looks == 4
    assert clock.sleeps == sorted(clock.sleeps) and clock.sleeps[0] == interop.POLL_FIRST


def test_failed_import_ends_the_wait_with_the_tasks_message() -> None:
    images = _FakeImages(
        [_Record("importing"), _Record("importing", {"os_glance_failed_import": "fs"})],
        [
            _Task("older", "2026-01-01T00:00:00Z"),
            _Task("Image failed checks", "2026-01-02"),
            _Task("Copied 0 MiB", "2026-01-03", "processing"),
        ],
    )
    with pytest.raises(interop.ImportFailed, match="into store fs failed: Image failed checks"):
        _wait(images)


def test_dead_status_and_timeout() -> None:
    with pytest.raises(interop.ImportFailed, match="went 'killed'"):
        _wait(_FakeImages([_Record("killed")]))
    images = _FakeImages([_Record("importing")])
    with pytest.raises(interop.ImportFailed, match=r"within 30 s \(image status 'importing'\)"):
        _wait(images, timeout=30)
    assert images.looks < 30  # the pauses grow to POLL_MAX


# -- requests that need no image, and Glance's words ---------------------------------------


class _Info:
    def __init__(self, methods: list[str]) -> None:
        self.import_methods = {"value": methods}


class _StoresAndInfo:
    def __init__(self, methods: list[str], stores_error: Exception | None = None) -> None:
        self.methods = methods
        self.stores_error = stores_error

    def get_import_info(self) -> _Info:
        return _Info(self.methods)

    def stores(self) -> list[Any]:
        if self.stores_error is not None:
            raise self.stores_error
        return []


def _http_error(status: int, reason: str, content_type: str, body: str) -> Exception:
    import requests
    from openstack import exceptions as os_exc

    response = requests.Response()
    response.status_code = status
    response.reason = reason
    response.headers["content-type"] = content_type
    response._content = body.encode()
    try:
        os_exc.raise_from_response(response)
    except os_exc.HttpException as exc:
        return exc
    raise AssertionError("no exception raised")


def test_cloud_without_glance_direct() -> None:
    conn = _Conn(_StoresAndInfo(["web-download", "copy-image"]))
    with pytest.raises(interop.ImportFailed, match=r"offers web-download, copy-image\)"):
        interop.check_glance_direct(conn)
    interop.check_glance_direct(_Conn(_StoresAndInfo(["glance-direct"])))


def test_store_on_a_single_store_cloud() -> None:
    error = _http_error(
        404, "Not Found", "text/plain", "404 Not Found\n\nMulti backend is not supported."
    )
    conn = _Conn(_StoresAndInfo([], error))
    with pytest.raises(interop.ImportFailed) as caught:
        interop.check_store(conn, "fs2")
    assert "Multi backend is not supported. (HTTP 404)" in str(caught.value)
    assert "needs Glance with multiple stores" in str(caught.value)


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        # webob's plain page: status, generic explanation, then Glance's detail
        ("text/plain; charset=UTF-8",
         "415 Unsupported Media Type\n\nThe request media type application/octet-stream is "
         "not supported by this server. \n\n Image failed safety checks",
         "Image failed safety checks (HTTP 415)"),
        ("text/html; charset=UTF-8",
         "<html>\n <head>\n  <title>409 Conflict</title>\n </head>\n <body>\n  <h1>409 "
         "Conflict</h1>\n  Image needs to be staged before &#x27;glance-direct&#x27; method "
         "can be used<br /><br />\n\n\n\n </body>\n</html>",
         "Image needs to be staged before 'glance-direct' method can be used (HTTP 409)"),
        ("application/json", '{"badRequest": {"message": "Invalid tag", "code": 400}}',
         "Invalid tag (HTTP 409)"),
        ("text/plain", "", "Conflict (HTTP 409)"),
    ],
)  # fmt: skip
def test_glance_errors_in_glances_words(content_type: str, body: str, expected: str) -> None:
    status = 415 if expected.endswith("415)") else 409
    reason = "Unsupported Media Type" if status == 415 else "Conflict"
    exc = _http_error(status, reason, content_type, body)
    text = interop.describe(exc)
    assert text == expected
    assert "Error for url" not in text and "HttpException" not in text
