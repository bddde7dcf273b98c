"""The main job, end to end, on images this script makes itself.

Builds a base image and an overlay with qemu-img (as an operator would after
``qemu-img create -b base ...``), then shows what qcowlib makes of them: ``info
--backing-chain``, ``map``, a read through the chain, ``convert -O raw`` of the whole
chain, and ``compare`` of the result with the chain.  Run it with ``tools/demo``.
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


def qcowlib_cli(*argv: str, cwd: Path) -> None:
    print(f"\n$ qcowlib {' '.join(argv)}", flush=True)
    subprocess.run([sys.executable, "-m", "qcowlib", *argv], cwd=cwd, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", metavar="DIR", help="build in DIR and keep the images")
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
    print("\ndemo: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
