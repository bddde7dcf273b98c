"""``qcowlib upload`` against a real Glance API on 127.0.0.1 (tests/glance_server.py).

A flattened overlay goes active with Glance's checksum and os_hash_value equal to ours
and downloads back equal to the chain; an overlay without --flatten is refused before any
byte is sent; a forced upload of an unsafe image is refused by Glance and leaves no image
behind; a size or checksum mismatch deletes the image and exits 1.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from qcowlib.core.digest import MultiHasher
from qcowlib.errors import QcowlibIOError
from qcowlib.glance import request, transfer
from qcowlib.glance import upload as up
from qcowlib.ops.flatten import flatten
from tests.conftest import qemu_img, qemu_json, require_qemu
from tests.glance_server import GlanceServer, environment_for_cli, free_port

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:openstack")

#: ``upload --output json``'s keys in the contract (Glance's fields).
CONTRACT_KEYS = {
    "id", "name", "status", "disk_format", "size", "virtual_size", "checksum",
    "os_hash_algo", "os_hash_value",
}  # fmt: skip


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    require_qemu()
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "64M")
    subprocess.run(
        ["qemu-io", "-c", "write -P 0xb5 0 2M", str(base)], check=True, capture_output=True
    )
    top = tmp_path / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x0e 1M 512k", str(top)], check=True, capture_output=True
    )
    return top


def run_upload(
    server: GlanceServer, tmp: Path, *args: str | Path
) -> subprocess.CompletedProcess[str]:
    clouds = server.clouds_yaml(tmp / "clouds.yaml", "test")
    return subprocess.run(
        [sys.executable, "-m", "qcowlib", "upload", "--os-cloud", "test", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        env=environment_for_cli(clouds),
        timeout=300,
    )


def images_named(server: GlanceServer, name: str) -> list[Any]:
    return [i for i in server.connection().image.images() if i.name == name]


def test_flattened_overlay_goes_active(
    glance_server: GlanceServer, chain: Path, tmp_path: Path
) -> None:
    res = run_upload(
        glance_server, tmp_path, "--name", "flat-ok", "--flatten", "--output", "json", chain
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) >= CONTRACT_KEYS  # the contract's keys, then extras beside them
    assert set(out) - CONTRACT_KEYS == {
        "container_format", "visibility", "protected", "tags", "stores", "computed",
    }  # fmt: skip
    # the digests computed while sending, equal to Glance's
    assert out["computed"] == {
        "size": out["size"], "md5": out["checksum"], "sha512": out["os_hash_value"],
    }  # fmt: skip
    assert out["container_format"] == "bare" and out["stores"] == ["fs"]
    assert out["status"] == "active" and out["disk_format"] == "qcow2"
    assert out["virtual_size"] == 64 << 20
    # our digests: the same bytes flatten writes to a file
    flat = tmp_path / "flat.qcow2"
    flatten(str(chain), str(flat))
    data = flat.read_bytes()
    assert out["size"] == len(data)
    assert out["checksum"] == hashlib.md5(data).hexdigest()
    assert out["os_hash_algo"] == "sha512"
    assert out["os_hash_value"] == hashlib.sha512(data).hexdigest()
    # downloads back equal to the chain
    conn = glance_server.connection()
    got = tmp_path / "down.qcow2"
    with got.open("wb") as f:
        for piece in conn.image.download_image(out["id"], stream=True).iter_content(1 << 20):
            f.write(piece)
    assert qemu_img("compare", chain, got).returncode == 0
    record = conn.image.get_image(out["id"])
    assert record.min_disk == 1  # derived from the 64 MiB virtual size


def test_overlay_refused_before_sending(
    glance_server: GlanceServer, chain: Path, tmp_path: Path
) -> None:
    res = run_upload(glance_server, tmp_path, "--name", "overlay-refused", chain)
    assert res.returncode == 1
    assert res.stderr.startswith("qcowlib: error: ") and "upload with --flatten" in res.stderr
    assert res.stderr.count("\n") == 1
    assert images_named(glance_server, "overlay-refused") == []


def test_unreachable_glance_is_one_clear_line(chain: Path, tmp_path: Path) -> None:
    """Nothing listens at the endpoint: exit 1, one line, and no image to clean up."""
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(
        "clouds:\n  dead:\n    auth_type: none\n"
        f"    image_endpoint_override: http://127.0.0.1:{free_port()}/\n"
    )
    res = subprocess.run(
        [sys.executable, "-m", "qcowlib", "upload", "--os-cloud", "dead", "--name", "x",
         "--flatten", str(chain)],
        capture_output=True, text=True, check=False, env=environment_for_cli(clouds), timeout=120,
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.startswith("qcowlib: error: upload failed: ")
    assert res.stderr.count("\n") == 1 and "no image was created" in res.stderr


def test_forced_unsafe_upload_refused_by_glance(
    glance_server: GlanceServer, chain: Path, tmp_path: Path
) -> None:
    res = run_upload(glance_server, tmp_path, "--name", "forced-unsafe", "--force", chain)
    assert res.returncode == 1, res.stdout
    assert "upload failed" in res.stderr
    assert images_named(glance_server, "forced-unsafe") == []


def test_raw_upload_with_properties(glance_server: GlanceServer, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    # Over two read blocks (hashed while the previous one is being sent), odd length.
    raw.write_bytes(bytes(range(256)) * (9 * transfer.READ_CHUNK // 256 // 4) + b"tail")
    res = run_upload(
        glance_server, tmp_path, "--name", "raw-props", "--min-ram", "512", "--property",
        "os_distro=centos", "--visibility", "private", "--output=json", raw,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    record = glance_server.connection().image.get_image(out["id"])
    assert record.disk_format == "raw" and record.min_ram == 512
    assert (
        record.properties.get("os_distro") == "centos"
        or getattr(record, "os_distro", None) == "centos"
    )
    assert out["checksum"] == hashlib.md5(raw.read_bytes()).hexdigest()


class _Blocks:
    """A source of given blocks, failing with ``error`` after them when one is given."""

    def __init__(self, blocks: list[bytes], error: Exception | None = None) -> None:
        self.blocks = blocks
        self.error = error
        self.size = sum(map(len, blocks))

    def chunks(self) -> Iterator[bytes]:
        yield from self.blocks
        if self.error is not None:
            raise self.error


def test_sender_pieces_and_digests() -> None:
    """Pieces stay under uWSGI's chunk limit, in order; the digests cover every byte."""
    rng = random.Random(5)
    blocks = [
        rng.randbytes(n) for n in (transfer.READ_CHUNK, 3, transfer.UPLOAD_CHUNK + 1, 0, 777_777)
    ]
    sent: list[tuple[int, int]] = []
    sender = transfer.Sender(
        cast(transfer.Source, _Blocks(blocks)), lambda n, t: sent.append((n, t))
    )
    pieces = [bytes(p) for p in sender]
    data = b"".join(blocks)
    assert b"".join(pieces) == data and sender.sent == len(data)
    assert all(0 < len(p) <= transfer.UPLOAD_CHUNK for p in pieces)
    assert sent[-1] == (len(data), len(data)) and len(sent) == len(pieces)
    digests = sender.hasher.hexdigests()
    assert digests["md5"] == hashlib.md5(data).hexdigest()
    assert digests["sha512"] == hashlib.sha512(data).hexdigest()


def test_sender_keeps_the_source_error() -> None:
    """A source failing mid-body: the error is kept for upload() to report."""
    boom = QcowlibIOError("read error: Input/output error")
    sender = transfer.Sender(cast(transfer.Source, _Blocks([b"x" * 1000] * 3, boom)), None)
    with pytest.raises(QcowlibIOError):
        list(sender)
    assert sender.error is boom and sender.sent == 3000
    assert sender.hasher.hexdigests()["md5"] == hashlib.md5(b"x" * 3000).hexdigest()


@pytest.mark.parametrize("extra", [-1, 1])
def test_sender_refuses_a_body_of_another_length(extra: int) -> None:
    """The body goes with a Content-Length: a source that ends early or runs long raises
    (the server is never left waiting for bytes that will not come)."""
    source = _Blocks([b"a" * 700, b"b" * 700])
    source.size += extra
    sender = transfer.Sender(cast(transfer.Source, source), None)
    assert len(sender) == source.size
    with pytest.raises(request.UploadError, match=r"ended after|grew past"):
        list(sender)
    assert sender.sent <= source.size


def test_size_mismatch_deletes_image(
    glance_server: GlanceServer, chain: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_init = transfer.Source.__init__

    def lying_init(self: transfer.Source, req: up.UploadRequest, disk_format: str) -> None:
        real_init(self, req, disk_format)
        self.size += 4096  # announce more than will be sent

    monkeypatch.setattr(transfer.Source, "__init__", lying_init)
    req = up.UploadRequest(path=str(chain), name="size-mismatch", flatten=True)
    with pytest.raises(request.UploadError):
        up.upload(req, connection=glance_server.connection())
    assert images_named(glance_server, "size-mismatch") == []


def test_checksum_mismatch_deletes_image(
    glance_server: GlanceServer, chain: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = MultiHasher.hexdigests

    def wrong(self: Any) -> dict[str, str]:
        out = dict(real(self))
        out["md5"] = "0" * 32
        return out

    monkeypatch.setattr(MultiHasher, "hexdigests", wrong)
    req = up.UploadRequest(path=str(chain), name="sum-mismatch", flatten=True)
    with pytest.raises(request.UploadError, match="checksum"):
        up.upload(req, connection=glance_server.connection())
    assert images_named(glance_server, "sum-mismatch") == []


@pytest.mark.parametrize("disk_format", ["vmdk", "vdi"])
def test_flattened_overlay_as_vmdk_or_vdi(
    glance_server: GlanceServer, chain: Path, tmp_path: Path, disk_format: str
) -> None:
    """--flatten --disk-format vmdk|vdi: Glance's inspector accepts the stream (a VMDK goes
    as streamOptimized), records our digests, and the image downloads equal to the chain."""
    name = f"flat-{disk_format}"
    res = run_upload(
        glance_server, tmp_path, "--name", name, "--flatten", "--disk-format", disk_format,
        "--output", "json", chain,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["status"] == "active" and out["disk_format"] == disk_format
    assert out["virtual_size"] == 64 << 20
    got = tmp_path / f"down.{disk_format}"
    conn = glance_server.connection()
    with got.open("wb") as f:
        for piece in conn.image.download_image(out["id"], stream=True).iter_content(1 << 20):
            f.write(piece)
    data = got.read_bytes()
    assert out["size"] == len(data)
    assert out["checksum"] == hashlib.md5(data).hexdigest()
    assert out["os_hash_value"] == hashlib.sha512(data).hexdigest()
    info = qemu_json("info", "-f", disk_format, got)
    assert "backing-filename" not in info
    if disk_format == "vmdk":
        assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert qemu_img("compare", "-F", disk_format, chain, got).returncode == 0
    assert qemu_img("check", "-f", disk_format, got, check=False).returncode == 0
