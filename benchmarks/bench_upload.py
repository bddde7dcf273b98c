"""Streamed upload to a local Glance: ``qcowlib upload --flatten`` of an overlay vs
openstacksdk's ``create_image(filename=...)`` of the already-flat file.

    .venv/bin/python -m benchmarks.bench_upload [--size 2G] [--data 512M] [--repeat 4]

Starts the same real Glance the tests use (tests/glance_server.py; run tools/glance-env
first).  qcowlib's side includes validation, planning the flattened layout (one read of
the chain), serializing it on the fly and hashing md5+sha512 while sending; the
reference sends a file that was flattened beforehand.  The ratio is throughput
qcowlib / openstacksdk, so higher is better (target >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._harness import GNU_TIME, Run, qcowlib_cmd, require_qemu
from benchmarks.bench_flatten import make_chain
from qcowlib._units import parse_size

REF = """
import sys, openstack.connection
conn = openstack.connection.Connection(auth_type="none", image_endpoint_override=sys.argv[1])
img = conn.image.create_image(name=sys.argv[3], filename=sys.argv[2], disk_format="qcow2",
                              container_format="bare", allow_duplicates=True, wait=False)
assert conn.image.get_image(img.id).status == "active"
"""


def tree_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its children."""
    if pid is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def children_cpu() -> float:
    """CPU seconds used so far by this process's waited-for children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str]) -> Run:
    import time

    os.sync()
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        code = subprocess.call(
            [GNU_TIME, "-f", "%M", *argv], stdout=subprocess.DEVNULL, stderr=err, env=env
        )
        elapsed = time.perf_counter() - t0
        err.seek(0)
        lines = err.read().strip().splitlines()
    if code:
        raise RuntimeError(f"{argv} failed: {lines[-3:]}")
    return Run(elapsed, int(lines[-1]) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--data", default="512M")
    parser.add_argument("--repeat", type=int, default=4)
    args = parser.parse_args()
    require_qemu()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.glance_server import GlanceServer, ensure_venv, environment_for_cli

    ensure_venv()
    with tempfile.TemporaryDirectory() as tmp, GlanceServer() as server:
        d = Path(tmp)
        top = make_chain(d, parse_size(args.size), parse_size(args.data))
        flat = d / "flat.qcow2"
        subprocess.run(
            [sys.executable, "-m", "qcowlib", "flatten", str(top), str(flat)], check=True
        )
        env = environment_for_cli(server.clouds_yaml(d / "clouds.yaml", "bench"))
        refs: list[Run] = []
        ours: list[Run] = []
        # Glance's CPU time per upload: its one request thread is what limits the
        # throughput here, and the client shares the machine's cores with it.
        glance_cpu: dict[str, list[float]] = {"ref": [], "ours": []}
        client_cpu: dict[str, list[float]] = {"ref": [], "ours": []}
        for i in range(args.repeat):
            for side, runs, argv in (
                ("ref", refs, [sys.executable, "-c", REF, server.endpoint, str(flat), f"ref{i}"]),
                ("ours", ours, qcowlib_cmd("upload", "--os-cloud", "bench", "--name",
                                           f"ours{i}", "--flatten", str(top))),
            ):  # fmt: skip
                before, mine = tree_cpu(server.pid), children_cpu()
                runs.append(timed(argv, env))
                glance_cpu[side].append(tree_cpu(server.pid) - before)
                client_cpu[side].append(children_cpu() - mine)
        ref = min(refs, key=lambda r: r.seconds)
        our = min(ours, key=lambda r: r.seconds)
        size = flat.stat().st_size
        print(f"{'case':<44}{'MB/s':>10}{'peak RSS MiB':>14}")
        for label, run in (
            ("openstacksdk create_image(filename=flat)", ref),
            ("qcowlib upload --flatten (overlay)", our),
        ):
            print(f"{label:<44}{size / run.seconds / 1e6:>10.1f}{run.peak_rss_mib:>14.1f}")
        median = statistics.median(r.seconds for r in refs) / statistics.median(
            r.seconds for r in ours
        )
        print(
            f"throughput ratio qcowlib/openstacksdk: {ref.seconds / our.seconds:.2f} best, "
            f"{median:.2f} median ({size} bytes)"
        )
        med = statistics.median
        print(
            f"median wall s: {med(r.seconds for r in refs):.2f} openstacksdk, "
            f"{med(r.seconds for r in ours):.2f} qcowlib; median CPU s of Glance's server: "
            f"{med(glance_cpu['ref']):.2f}, {med(glance_cpu['ours']):.2f}; of the client: "
            f"{med(client_cpu['ref']):.2f}, {med(client_cpu['ours']):.2f}"
        )


if __name__ == "__main__":
    main()
