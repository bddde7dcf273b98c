"""Smoke tests of the real Glance test server (tests/glance_server.py) through openstacksdk.

They pin down what later ``qcowlib upload`` tests rely on: a streamed (chunked) upload
from an iterator goes ``active`` with Glance's md5 ``checksum`` and sha512
``os_hash_value`` equal to ours, downloads give the same bytes back, Glance's safety
check refuses a qcow2 with a backing file, deletion works, and clouds.yaml entries
written by the fixture are usable with ``--os-cloud``-style lookups.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from tests.conftest import qemu_img, require_qemu
from tests.glance_server import (
    GlanceServer,
    GlanceServerError,
    environment_for_cli,
    require_openstacksdk,
)

# openstacksdk warns about its own internal use of APIs it deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:openstack")

CHUNK = 512 * 1024  # safely below uWSGI's default chunked-input limit (1,048,568 bytes)


@pytest.fixture(scope="module")
def conn(glance_server: GlanceServer) -> Any:
    """An openstacksdk connection to the session's Glance server."""
    require_openstacksdk()
    return glance_server.connection()


class HashingChunks:
    """Yield ``data`` in ``CHUNK``-sized pieces, hashing exactly what is handed out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.md5 = hashlib.md5()
        self.sha512 = hashlib.sha512()
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for start in range(0, len(self.data), CHUNK):
            chunk = self.data[start : start + CHUNK]
            self.md5.update(chunk)
            self.sha512.update(chunk)
            self.sent += len(chunk)
            yield chunk


def _payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _upload(conn: Any, name: str, data: bytes, disk_format: str) -> tuple[Any, HashingChunks]:
    """Stream ``data`` as a new image; return Glance's view of it afterwards."""
    chunks = HashingChunks(data)
    image = conn.image.create_image(
        name=name,
        data=cast(Any, iter(chunks)),
        disk_format=disk_format,
        container_format="bare",
        size=len(data),
    )
    return conn.image.get_image(image.id), chunks


def _download(conn: Any, image: Any) -> bytes:
    response = conn.image.download_image(image, stream=True)
    try:
        return b"".join(response.iter_content(chunk_size=CHUNK))
    finally:
        response.close()


def test_healthcheck(glance_server: GlanceServer) -> None:
    assert glance_server.endpoint.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(f"{glance_server.endpoint}/healthcheck", timeout=10) as reply:
        assert reply.status == 200
        assert reply.read() == b"OK"


def test_streamed_upload_checksums_and_download(conn: Any) -> None:
    data = _payload(3 * 1024 * 1024 + 12345, seed=1)  # several chunks and a short tail
    image, sent = _upload(conn, "smoke-raw", data, "raw")
    try:
        assert sent.sent == len(data)
        assert image.status == "active"
        assert image.size == len(data)
        assert image.checksum == sent.md5.hexdigest() == hashlib.md5(data).hexdigest()
        assert image.hash_algo == "sha512"
        assert image.hash_value == sent.sha512.hexdigest() == hashlib.sha512(data).hexdigest()
        assert _download(conn, image) == data
    finally:
        conn.image.delete_image(image, ignore_missing=True)


def test_qcow2_with_backing_file_refused(conn: Any, tmp_path: Path) -> None:
    require_qemu()
    import openstack.exceptions

    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "4M")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "top.qcow2"
    )
    data = (tmp_path / "top.qcow2").read_bytes()
    name = "smoke-backing"
    with pytest.raises(openstack.exceptions.HttpException) as caught:
        _upload(conn, name, data, "qcow2")
    refusal = caught.value
    assert refusal.status_code == 415
    assert refusal.response is not None
    assert "Image failed safety checks" in refusal.response.text, refusal.response.text
    left = list(conn.image.images(name=name))
    assert all(image.status != "active" for image in left)
    for image in left:
        conn.image.delete_image(image, ignore_missing=True)


def test_delete(conn: Any) -> None:
    import openstack.exceptions

    image, _ = _upload(conn, "smoke-delete", _payload(CHUNK + 1, seed=2), "raw")
    assert image.status == "active"
    conn.image.delete_image(image, ignore_missing=False)
    with pytest.raises(openstack.exceptions.NotFoundException):
        conn.image.get_image(image.id)
    assert not list(conn.image.images(name="smoke-delete"))


def test_clouds_yaml_entry(
    glance_server: GlanceServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_openstacksdk()
    import openstack

    clouds = glance_server.clouds_yaml(tmp_path / "clouds.yaml", "first")
    glance_server.clouds_yaml(clouds, "second")  # adds to the same file
    for key in [k for k in os.environ if k.startswith("OS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
    cloud = openstack.connect(cloud="first")
    assert isinstance(list(cloud.image.images()), list)
    endpoint = cloud.image.get_endpoint()
    assert endpoint is not None
    assert endpoint.rstrip("/") in {glance_server.endpoint, f"{glance_server.endpoint}/v2"}
    # As a command-line program would use it: a separate process, --os-cloud style.
    probe = "import openstack; c = openstack.connect(cloud='second'); print(c.image.get_endpoint())"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env=environment_for_cli(clouds),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(glance_server.endpoint)


def test_missing_venv_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GlanceServerError, match="tools/glance-env"):
        GlanceServer(tmp_path / "no-venv").start()


def test_stop_leaves_no_process(glance_server: GlanceServer) -> None:
    server = GlanceServer(glance_server.venv)
    with server:
        assert server.port != glance_server.port
        pid = server.pid
        assert pid is not None and server.running
        workdir = server.workdir
    assert server.pid is None and not server.running
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing left in the server's process group
    assert not workdir.exists()
    assert server.start_seconds is not None and server.stop_seconds is not None
    assert server.stop_seconds < server.stop_timeout + 1


def test_context_pipeline_import(glance_context_server: GlanceServer) -> None:
    """Interoperable import (stage + glance-direct) needs the header-trusting pipeline."""
    require_openstacksdk()
    data = _payload(CHUNK + 777, seed=3)
    server = glance_context_server
    conn = server.connection()
    chunks = HashingChunks(data)
    created = conn.image.create_image(
        name="smoke-import",
        data=cast(Any, iter(chunks)),
        disk_format="raw",
        container_format="bare",
        size=len(data),
        use_import=True,
    )
    deadline = time.monotonic() + 30
    while True:
        image = conn.image.get_image(created.id)
        failed = image.properties.get("os_glance_failed_import")
        if image.status == "active" or failed or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not failed, server.log_tail()
    assert image.status == "active", server.log_tail()
    assert image.owner == server.project_id
    assert image.checksum == chunks.md5.hexdigest()
    assert image.hash_value == chunks.sha512.hexdigest()
    with pytest.raises(GlanceServerError, match="unauthenticated"):
        server.clouds_yaml(Path(server.workdir, "clouds.yaml"))
