"""``qcowlib upload``'s cloud configuration and ``openstack image create`` options.

Cloud options come from openstacksdk's own argparse integration (``--os-*`` and ``OS_*``);
errors say what to configure and where it was looked for; local problems are reported
before any network request (the endpoints here would fail if they were asked).  Tags,
visibility, stores and container formats are checked in the record of a real Glance
(tests/glance_server.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

import qcowlib
from qcowlib.cli import build_parser
from tests.conftest import qemu_img, require_qemu
from tests.glance_server import GlanceServer, environment_for_cli, free_port

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:openstack")

SRC = str(Path(qcowlib.__file__).resolve().parent.parent)


def cli(
    *args: str | Path, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcowlib", "upload", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def bare_env(tmp: Path) -> dict[str, str]:
    """No OS_* variable, a HOME with no clouds.yaml; PYTHONPATH kept (runs this tree)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    env["HOME"] = str(tmp / "home")
    env["PYTHONPATH"] = SRC  # the tests run in other directories
    return env


def dead_cloud(tmp: Path) -> dict[str, str]:
    """A clouds.yaml whose only cloud, ``dead``, points at a port nobody listens on."""
    clouds = tmp / "clouds.yaml"
    clouds.write_text(
        "clouds:\n  dead:\n    auth_type: none\n"
        f"    image_endpoint_override: http://127.0.0.1:{free_port()}/\n"
    )
    return environment_for_cli(clouds, bare_env(tmp))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    require_qemu()
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x5a 0 1M", str(path)], check=True, capture_output=True
    )
    return path


@pytest.fixture
def overlay(image: Path) -> Path:
    top = image.parent / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", image.name, "-F", "qcow2", top)
    return top


# -- configuration errors -------------------------------------------------------------


def test_no_cloud_configured_says_what_to_set(image: Path, tmp_path: Path) -> None:
    res = cli("--name", "x", image, env=bare_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    err = res.stderr
    assert err.startswith("qcowlib: error: no cloud configured")
    for needed in ("clouds.yaml", "--os-cloud", "OS_CLOUD", "OS_AUTH_URL", "auth_url"):
        assert needed in err
    # where it looked: the current directory and ~/.config/openstack
    assert str(tmp_path) in err and str(tmp_path / "home" / ".config" / "openstack") in err


@pytest.mark.parametrize("how", ["--os-cloud", "--os_cloud", "environment"])
def test_unknown_cloud_names_the_files(image: Path, tmp_path: Path, how: str) -> None:
    env = dead_cloud(tmp_path)
    args: list[str | Path] = ["--name", "x", image]
    if how.startswith("--"):  # openstack's spelling with _ is accepted too
        args = [how, "mycloud", *args]
    else:
        env["OS_CLOUD"] = "mycloud"
    res = cli(*args, env=env, cwd=tmp_path)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    err = res.stderr
    assert "'mycloud'" in err and "--os-cloud or OS_CLOUD" in err
    assert f"is not in {tmp_path / 'clouds.yaml'} (it defines dead)" in err
    assert f"OS_CLIENT_CONFIG_FILE={tmp_path / 'clouds.yaml'}" in err
    assert str(tmp_path / "home" / ".config" / "openstack") in err


def test_unknown_cloud_without_any_file(image: Path, tmp_path: Path) -> None:
    res = cli("--os-cloud", "mycloud", "--name", "x", image, env=bare_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "'mycloud'" in res.stderr and "not found: no clouds.yaml" in res.stderr


def test_help_despite_an_unknown_cloud(tmp_path: Path) -> None:
    env = bare_env(tmp_path)
    env["OS_CLOUD"] = "nope"
    res = cli("--help", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "--tag TAG" in res.stdout and "--os-cloud" in res.stdout
    assert "The cloud configuration has a problem: cloud 'nope'" in " ".join(res.stdout.split())


def test_cloud_lacking_auth_url(image: Path, tmp_path: Path) -> None:
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text("clouds:\n  half:\n    auth:\n      username: u\n")
    env = environment_for_cli(clouds, bare_env(tmp_path))
    res = cli("--os-cloud", "half", "--name", "x", image, env=env, cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert f"cloud 'half' ({clouds}) lacks auth_url" in res.stderr
    assert "--os-auth-url" in res.stderr and "OS_AUTH_URL" in res.stderr


def test_library_cloud_name_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``upload(req, cloud=NAME)`` reads the same configuration, with the same errors."""
    from qcowlib.glance.cloud import CloudConfigError, connect

    for key in [k for k in os.environ if k.startswith("OS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text("clouds:\n  one:\n    auth_type: none\n")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
    with pytest.raises(
        CloudConfigError, match=r"'two' .* is not in .*clouds.yaml \(it defines one\)"
    ):
        connect(cloud="two")
    assert connect(cloud="one") is not None  # no request is made yet


# -- local problems first -------------------------------------------------------------


def test_missing_base_reported_before_the_network(overlay: Path, tmp_path: Path) -> None:
    (overlay.parent / "disk.qcow2").rename(overlay.parent / "moved.qcow2")
    res = cli("--os-cloud", "dead", "--name", "x", "--flatten", overlay, env=dead_cloud(tmp_path))
    assert res.returncode == 1
    assert "backing file 'disk.qcow2'" in res.stderr and "does not exist" in res.stderr
    assert "reach" not in res.stderr and "connect" not in res.stderr


def test_validation_failure_reported_before_the_network(overlay: Path, tmp_path: Path) -> None:
    res = cli("--os-cloud", "dead", "--name", "x", overlay, env=dead_cloud(tmp_path))
    assert res.returncode == 1
    assert res.stderr.startswith("qcowlib: error: upload refused, nothing was sent")


def test_request_checked_before_the_cloud(image: Path, tmp_path: Path) -> None:
    """Even with no cloud configured at all, a bad request is the error shown."""
    env = bare_env(tmp_path)
    res = cli("--name", "x", "--container-format", "ova", image, env=env, cwd=tmp_path)
    assert res.returncode == 1
    assert "--container-format ova: give --disk-format" in res.stderr
    res = cli("--name", "x", "--tag", "", image, env=env, cwd=tmp_path)
    assert res.returncode == 1 and "tags are 1 to 255 characters" in res.stderr
    res = cli("--name", "x", "--public", "--private", image, env=env, cwd=tmp_path)
    assert res.returncode == 2 and "not allowed with argument" in res.stderr


def test_unreachable_endpoint_in_plain_words(image: Path, tmp_path: Path) -> None:
    res = cli("--os-cloud", "dead", "--name", "x", image, env=dead_cloud(tmp_path))
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert "cannot reach Glance at http://127.0.0.1:" in res.stderr
    assert "no image was created" in res.stderr
    assert "version hack" not in res.stderr  # keystoneauth's own wording


# -- the parser -----------------------------------------------------------------------


def _upload_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = build_parser("upload")
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub: argparse.ArgumentParser = action.choices["upload"]
    sub.parse_known_args(argv)  # the cloud options are added on the first parse
    return sub


def test_every_option_has_help(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in [k for k in os.environ if k.startswith("OS_")]:
        monkeypatch.delenv(key)
    sub = _upload_parser(["--name", "x", "f"])
    names = {s for a in sub._actions for s in a.option_strings}
    for option in ("--os-cloud", "--os-auth-url", "--os-image-endpoint-override", "--tag"):
        assert option in names
    undocumented = [
        a.option_strings or [a.dest]
        for a in sub._actions
        if not a.help  # SUPPRESS is set
    ]
    assert undocumented == []


def test_other_commands_do_not_import_openstack() -> None:
    code = (
        "import sys; from qcowlib.cli import build_parser; build_parser(); "
        "print(any(m == 'openstack' or m.startswith('openstack.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- against Glance -------------------------------------------------------------------


def test_os_variables_and_options_without_clouds_yaml(
    glance_server: GlanceServer, image: Path, tmp_path: Path
) -> None:
    """openstacksdk's OS_* variables and --os-* options reach the connection."""
    env = bare_env(tmp_path)
    env["OS_AUTH_TYPE"] = "none"
    env["OS_IMAGE_ENDPOINT_OVERRIDE"] = glance_server.endpoint
    res = cli("--name", "by-env", "--output", "json", image, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"] == "active"
    res = cli(
        "--os-auth-type", "none", "--os-image-endpoint-override", glance_server.endpoint,
        "--name", "by-options", "--output", "json", image, env=bare_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["name"] == "by-options"


def run_upload(
    server: GlanceServer, tmp: Path, *args: str | Path
) -> subprocess.CompletedProcess[str]:
    # Another cloud beside it, that would fail: --os-cloud must choose.
    dead = {"auth_type": "none", "image_endpoint_override": f"http://127.0.0.1:{free_port()}/"}
    (tmp / "clouds.yaml").write_text(json.dumps({"clouds": {"dead": dead}}))
    clouds = server.clouds_yaml(tmp / "clouds.yaml", "test")
    return cli("--os-cloud", "test", *args, env=environment_for_cli(clouds))


def images_named(server: GlanceServer, name: str) -> list[Any]:
    return [i for i in server.connection().image.images() if i.name == name]


def test_tags_visibility_store(glance_server: GlanceServer, image: Path, tmp_path: Path) -> None:
    res = run_upload(
        glance_server, tmp_path, "--name", "tagged", "--tag", "golden", "--tag", "ci",
        "--tag", "ci", "--community", "--store", "fs2", "--output", "json", image,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    record = glance_server.connection().image.get_image(out["id"])
    assert sorted(record.tags) == ["ci", "golden"] == out["tags"]
    assert record.visibility == "community" == out["visibility"]
    assert record.properties["stores"] == "fs2" and out["stores"] == ["fs2"]
    stored = glance_server.workdir / "images2" / out["id"]
    assert hashlib.md5(stored.read_bytes()).hexdigest() == out["checksum"]
    assert out["checksum"] == hashlib.md5(image.read_bytes()).hexdigest()


def test_unknown_store_refused_before_an_image_exists(
    glance_server: GlanceServer, image: Path, tmp_path: Path
) -> None:
    res = run_upload(glance_server, tmp_path, "--name", "no-store", "--store", "nope", image)
    assert res.returncode == 1
    assert "--store nope: no such store in this cloud (it has fs (default), fs2)" in res.stderr
    assert "no image was created" in res.stderr
    assert images_named(glance_server, "no-store") == []


def test_forced_failure_in_glances_words(
    glance_server: GlanceServer, overlay: Path, tmp_path: Path
) -> None:
    res = run_upload(glance_server, tmp_path, "--name", "forced", "--force", overlay)
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    err = res.stderr
    assert "Image failed safety checks (HTTP 415)" in err
    assert "sent with --force despite validation errors (backing-file)" in err
    assert "image deleted" in err
    for sdk_text in ("Client Error for url", "HttpException", "BadRequest", "http://"):
        assert sdk_text not in err


def test_ova_container(glance_server: GlanceServer, image: Path, tmp_path: Path) -> None:
    """Not bare: Glance does not inspect; the tar goes as it is, with our digests."""
    ova = tmp_path / "appliance.ova"
    with tarfile.open(ova, "w") as tar:
        tar.add(image, arcname="disk.qcow2")
    res = run_upload(
        glance_server, tmp_path, "--name", "ova", "--container-format", "ova",
        "--disk-format", "qcow2", "--output", "json", ova,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["container_format"] == "ova" and out["status"] == "active"
    data = ova.read_bytes()
    assert out["size"] == len(data) and out["computed"]["md5"] == hashlib.md5(data).hexdigest()
    # no min_disk derived from the size of a tar
    assert glance_server.connection().image.get_image(out["id"]).min_disk == 0


def test_import_refused_with_5xx_is_an_error(
    glance_server: GlanceServer, image: Path, tmp_path: Path
) -> None:
    """The unauthenticated pipeline has no project: Glance answers the import call with
    500, which openstacksdk returns without raising; it must still fail, and clean up."""
    res = run_upload(glance_server, tmp_path, "--name", "import-500", "--import", image)
    assert res.returncode == 1, res.stdout
    assert "Glance refused the import request" in res.stderr and "(HTTP 500)" in res.stderr
    assert "image deleted" in res.stderr
    assert images_named(glance_server, "import-500") == []
