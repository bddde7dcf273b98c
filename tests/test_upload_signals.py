"""``upload`` interrupted, timed out, and warning, against the real local Glance of
tests/glance_server.py (and a socket that never answers).

An upload stopped by SIGTERM, SIGINT or SIGHUP mid-body deletes the Glance image it
created, names it, and exits 128 + N; a Glance that accepts connections and never
answers ends in one clear line within the timeouts; validation warnings are shown on
stderr before anything is sent.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qcowlib.errors import InvalidArgument
from qcowlib.glance import transfer
from tests.conftest import qemu_img, require_qemu
from tests.glance_server import GlanceServer, environment_for_cli
from tests.test_upload import images_named, run_upload

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:openstack")

MiB = 1 << 20


def _progress_at_least(err: bytearray, pct: float) -> bool:
    for part in err.decode(errors="replace").replace("\r", "\n").split("(")[1:]:
        try:
            if float(part.split("/", 1)[0]) >= pct:
                return True
        except ValueError:
            continue
    return False


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"]
)
def test_signal_mid_upload_deletes_the_image(
    glance_server: GlanceServer, tmp_path: Path, sig: int
) -> None:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:  # sparse: cheap here, 256 MiB for Glance to receive
        f.truncate(256 * MiB)
    name = f"interrupted-{signal.Signals(sig).name}"
    clouds = glance_server.clouds_yaml(tmp_path / "clouds.yaml", "test")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcowlib", "upload", "--os-cloud", "test", "--name", name,
         "--disk-format", "raw", "-p", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment_for_cli(clouds),
    )  # fmt: skip
    err = bytearray()
    assert proc.stderr is not None
    fd = proc.stderr.fileno()

    def read() -> None:
        while chunk := os.read(fd, 4096):
            err.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not _progress_at_least(err, 2.0) and proc.poll() is None:
        assert time.monotonic() < deadline, err.decode()
        time.sleep(0.002)
    assert proc.poll() is None, "the upload finished before it could be interrupted"
    proc.send_signal(sig)
    rc = proc.wait(180)
    reader.join(10)
    text = err.decode(errors="replace")
    assert rc == 128 + sig, text
    assert "Traceback" not in text
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    m = re.fullmatch(
        rf"qcowlib: error: interrupted by {signal.Signals(sig).name}: "
        r"Glance image deleted: ([0-9a-f-]{36})",
        last,
    )
    assert m, text
    assert images_named(glance_server, name) == []
    assert glance_server.connection().image.find_image(m.group(1)) is None


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An HTTP endpoint on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(conn)  # kept open, never read, never answered

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


def test_a_glance_that_never_answers_times_out(silent_endpoint: str, tmp_path: Path) -> None:
    require_qemu()
    image = tmp_path / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(
        f"clouds:\n  silent:\n    auth_type: none\n    image_endpoint_override: {silent_endpoint}\n"
    )
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "qcowlib", "upload", "--os-cloud", "silent", "--name", "x",
         "--connect-timeout", "2", "--read-timeout", "1.5", str(image)],
        capture_output=True, text=True, check=False, env=environment_for_cli(clouds), timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert res.returncode == 1
    assert res.stderr.startswith("qcowlib: error: upload failed: ")
    assert res.stderr.count("\n") == 1
    assert "did not answer within the timeouts: connect 2 s, read 1.5 s" in res.stderr
    assert "no image was created" in res.stderr
    # A few requests (version discovery tries more than one URL), each bounded.
    assert elapsed < 30, elapsed


def test_timeouts_default_to_api_timeout_then_ours() -> None:
    """As openstack does: clouds.yaml ``api_timeout`` is the session's timeout; the
    options override it; without either, qcowlib's defaults apply."""
    openstack = pytest.importorskip("openstack")
    endpoint = "http://127.0.0.1:9/"
    plain = openstack.connect(auth_type="none", image_endpoint_override=endpoint)
    assert transfer.apply_timeouts(plain) == (transfer.CONNECT_TIMEOUT, transfer.READ_TIMEOUT)
    assert plain.session.timeout == (transfer.CONNECT_TIMEOUT, transfer.READ_TIMEOUT)
    configured = openstack.connect(
        auth_type="none", image_endpoint_override=endpoint, api_timeout=7
    )
    assert transfer.apply_timeouts(configured) == (7.0, 7.0)
    assert transfer.apply_timeouts(configured, read_timeout=3) == (7.0, 3.0)
    with pytest.raises(InvalidArgument):
        transfer.apply_timeouts(plain, connect_timeout=0)


def test_upload_shows_validation_warnings_before_sending(
    glance_server: GlanceServer, tmp_path: Path
) -> None:
    """A dirty qcow2 (the dirty bit set) is a warning, not an error: it is shown on
    stderr, then the image is sent and goes active."""
    require_qemu()
    image = tmp_path / "dirty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    with image.open("r+b") as f:
        f.seek(0x48 + 7)
        bits = f.read(1)[0]
        f.seek(0x48 + 7)
        f.write(bytes([bits | 1]))
    res = run_upload(glance_server, tmp_path, "--name", "dirty-warned", image)
    assert res.returncode == 0, res.stderr
    (warning,) = res.stderr.splitlines()
    assert warning.startswith("qcowlib: WARNING: ") and "[dirty]" in warning
    assert images_named(glance_server, "dirty-warned")
