"""The main job, end to end, on images this script makes itself.

The operator's story: a base image and an overlay made with ``qemu-img create -b``
would fail in Glance without its base.  This script builds both, then shows qcowlib at
work: ``info --backing-chain`` and ``map`` of the chain, a read through it, ``validate``
refusing the overlay, ``flatten`` into one standalone image, ``validate`` accepting
that, ``check`` and ``checksum`` of it, ``compare`` against the chain, and with
``--glance`` an upload (``upload --flatten`` of the overlay itself) to a real Glance
started on 127.0.0.1 for the occasion.  Run it with ``tools/demo`` (add ``--glance``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import qcowlib


def sh(*argv: str | Path, cwd: Path) -> None:
    """Run a command, echoing it as a user would type it."""
    shown = " ".join(str(a) for a in argv)
    print(f"\n$ {shown}", flush=True)
    subprocess.run([str(a) for a in argv], cwd=cwd, check=True)


def qcowlib_cli(
    *argv: str, cwd: Path, ok: tuple[int, ...] = (0,), env: dict[str, str] | None = None
) -> None:
    """Run qcowlib as a user would; ``ok`` lists the exit statuses expected."""
    print(f"\n$ qcowlib {' '.join(argv)}", flush=True)
    argv_full = [sys.executable, "-m", "qcowlib", *argv]
    status = subprocess.run(argv_full, check=False, cwd=cwd, env=env).returncode
    if status not in ok:
        raise SystemExit(f"demo: qcowlib {argv[0]} exited {status}, expected {ok}")


def upload_to_local_glance(work: Path) -> None:
    """Start a real Glance on 127.0.0.1 (as the tests do) and upload the overlay."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.glance_server import GlanceServer, ensure_venv, environment_for_cli

    print("\n# starting a local Glance API on 127.0.0.1 (tools/glance-env installs it)")
    ensure_venv()
    with GlanceServer() as server:
        clouds = server.clouds_yaml(work / "clouds.yaml", "local")
        env = environment_for_cli(clouds)
        qcowlib_cli(
            "upload", "--os-cloud", "local", "--name", "demo-overlay", "overlay.qcow2",
            cwd=work, ok=(1,), env=env,
        )  # fmt: skip
        qcowlib_cli(
            "upload", "--os-cloud", "local", "--name", "demo", "--flatten", "-p",
            "--output", "json", "overlay.qcow2", cwd=work, env=env,
        )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", metavar="DIR", help="build in DIR and keep the images")
    parser.add_argument("--glance", action="store_true", help="also upload to a local Glance")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        sh("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "64M", cwd=work)
        sh("qemu-io", "-f", "qcow2", "-c", "write -P 0xb5 0 4M", "base.qcow2", cwd=work)
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
           "overlay.qcow2", cwd=work)  # fmt: skip
        sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x0e 1M 512k", "overlay.qcow2", cwd=work)
        qcowlib_cli("info", "--backing-chain", "overlay.qcow2", cwd=work)
        qcowlib_cli("map", "--output", "json", "overlay.qcow2", cwd=work)

        print("\n# reading through the chain with the Python API", flush=True)
        with qcowlib.open(str(work / "overlay.qcow2")) as disk:
            print(f"format={disk.format} virtual_size={disk.virtual_size}")
            print("chain:", " -> ".join(d.filename for d in disk.chain))
            print("byte 0 (from base):", hex(disk.read(0, 1)[0]))
            print("byte 1M (from overlay):", hex(disk.read(1 << 20, 1)[0]))

        qcowlib_cli("convert", "-O", "raw", "overlay.qcow2", "flat.raw", cwd=work)
        qcowlib_cli("compare", "overlay.qcow2", "flat.raw", cwd=work)
        sh("qemu-img", "compare", "overlay.qcow2", "flat.raw", cwd=work)

        print("\n# Glance would store the overlay without its base: validate says so", flush=True)
        qcowlib_cli("validate", "--disk-format", "qcow2", "overlay.qcow2", cwd=work, ok=(1,))
        qcowlib_cli("flatten", "overlay.qcow2", "standalone.qcow2", cwd=work)
        qcowlib_cli("validate", "--disk-format", "qcow2", "standalone.qcow2", cwd=work)
        qcowlib_cli("check", "standalone.qcow2", cwd=work)
        qcowlib_cli("checksum", "--content", "standalone.qcow2", cwd=work)
        qcowlib_cli("checksum", "--content", "--algo", "sha256", "overlay.qcow2", cwd=work)
        qcowlib_cli("compare", "overlay.qcow2", "standalone.qcow2", cwd=work)
        if args.glance:
            upload_to_local_glance(work)
    print("\ndemo: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
