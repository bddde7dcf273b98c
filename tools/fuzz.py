"""Mutation fuzzing of every reader: qemu-img's images, damaged at random, must fail cleanly.

    tools/fuzz [--seconds N] [--cases N] [--seed N] [--out DIR] [--seeds DIR]

Seed images of every format qcowlib reads are made with qemu-img and qemu-io (and QEMU's
own sample images from ``$QCOWLIB_SAMPLE_IMAGES`` when present).  Each case copies one,
applies a few random mutations (bytes, bit flips, 16/32/64-bit extreme values at random
offsets, mostly in the metadata at the start; truncation; appended zeros), and runs
``info``, ``open`` + ``extents`` + reads, ``check``, ``validate``, ``convert -O raw``
and, last, in-place writes, a snapshot, ``amend`` and ``check -r all`` on it, through
the API in a forked child with an alarm.  Anything but a :class:`qcowlib.QcowlibError`,
a crash, or a child still running after the alarm is a defect: the mutated image and
the traceback are saved under ``--out`` and the run exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

ALARM_SECONDS = 30
READ_CAP = 1 << 20
EXTENT_CAP = 100_000

SEED_SPECS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("v3.qcow2", "qcow2", ("-o", "cluster_size=4096")),
    ("v2-512.qcow2", "qcow2", ("-o", "compat=0.10,cluster_size=512")),
    ("extl2.qcow2", "qcow2", ("-o", "extended_l2=on")),
    ("rc1.qcow2", "qcow2", ("-o", "refcount_bits=1,cluster_size=4096")),
    ("rc64.qcow2", "qcow2", ("-o", "refcount_bits=64,cluster_size=4096")),
    ("a.qed", "qed", ("-o", "cluster_size=4096")),
    ("a.vmdk", "vmdk", ()),
    ("a.vdi", "vdi", ()),
    ("a.vhd", "vpc", ()),
    ("a.vhdx", "vhdx", ("-o", "block_size=1M")),
    ("a.parallels", "parallels", ()),
)
WRITES = ("write -P 0x11 0 64k", "write -P 0x22 1M 8k", "write -z 2M 64k")
SAMPLES = ("empty.bochs", "simple-pattern.cloop", "simple-dmg.dmg", "parallels-v1")


def run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def make_seeds(where: Path) -> list[Path]:
    """qemu-img's images of every format, small, with data, zero and unallocated parts."""
    where.mkdir(parents=True, exist_ok=True)
    for name, fmt, opts in SEED_SPECS:
        path = where / name
        run("qemu-img", "create", "-q", "-f", fmt, *opts, path, "4M")
        run("qemu-io", "-f", fmt, *(a for w in WRITES for a in ("-c", w)), path)
    top = where / "v3.qcow2"
    run("qemu-img", "snapshot", "-c", "s1", top)
    run(
        "qemu-img",
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        top,
        where / "zlib.qcow2",
    )
    run(
        "qemu-img",
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096,compression_type=zstd",
        top,
        where / "zstd.qcow2",
    )
    run(
        "qemu-img",
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        top,
        where / "stream.vmdk",
    )
    run("qemu-img", "convert", "-O", "qcow", top, where / "a.qcow")
    luks = ("qemu-img", "create", "-q", "-f", "luks", "--object", "secret,id=s,data=x")
    for _ in range(10):  # qemu's PBKDF2 timing probe fails now and then under load
        made = subprocess.run(
            [*luks, "-o", "key-secret=s,iter-time=10", str(where / "a.luks"), "1M"],
            capture_output=True,
            check=False,
        )
        if made.returncode == 0:
            break
    _test_built_seeds(where)
    samples = Path(os.environ.get("QCOWLIB_SAMPLE_IMAGES", "~/.cache/qcowlib-samples"))
    for name in SAMPLES:
        if (samples.expanduser() / name).is_file():
            shutil.copyfile(samples.expanduser() / name, where / name)
    return sorted(where.iterdir())


def _test_built_seeds(where: Path) -> None:
    """Images qemu-img cannot make, built by the test suite's builders (when this runs
    from a source tree): a VHDX with a log to replay and a COWD (ESX) extent on its own."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from tests.formats import esx_builders, vhdx_log_builder
    except ImportError:
        return
    finally:
        sys.path.pop(0)
    dirty = where / "dirty-log.vhdx"
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", dirty, "4M")
    run("qemu-io", "-f", "vhdx", "-c", "write -P 0x33 0 64k", dirty)
    end = dirty.stat().st_size
    data = vhdx_log_builder.Data(end - 4096, vhdx_log_builder.sector(0x5A, b"tag"))
    zero = vhdx_log_builder.Zero(end - 8192, 4096)
    one = vhdx_log_builder.entry(5, [data, zero], flushed=end, last=end)
    vhdx_log_builder.make_dirty(dirty, [(0, one)])
    grains = {0: b"\x11" * 512, 33: b"\x22" * 512}
    text = b"CID=abcdef01\nparentCID=ffffffff\n"
    (where / "alone.cowd").write_bytes(esx_builders.cowd(2048, grains, text=text))


def _value(rng: random.Random) -> int:
    return rng.choice(
        (
            0,
            1,
            0x7F,
            0x80,
            0xFF,
            0xFFFF,
            1 << 31,
            0xFFFF_FFFF,
            1 << 63,
            (1 << 64) - 1,
            rng.getrandbits(64),
        )
    )


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A few random mutations; most land in the first 64 KiB, where the metadata is."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if len(out) < 16:
            break
        hot = min(len(out), 1 << 16)
        pos = rng.randrange(hot) if rng.random() < 0.8 else rng.randrange(len(out))
        kind = rng.random()
        if kind < 0.45:
            out[pos] = rng.randrange(256)
        elif kind < 0.65:
            out[pos] ^= 1 << rng.randrange(8)
        elif kind < 0.9:
            width = rng.choice((2, 4, 8))
            value = _value(rng) % (1 << (8 * width))
            raw = value.to_bytes(width, "big")
            out[pos : pos + width] = raw if rng.random() < 0.5 else raw[::-1]
        elif rng.random() < 0.5:
            del out[rng.randrange(len(out)) :]
        else:
            out += bytes(rng.randrange(1, 1 << 16))
    return bytes(out)


def exercise(path: str) -> None:
    """Every reading operation; only QcowlibError may come out of each."""
    import qcowlib

    def guarded(step: Callable[[], object]) -> None:
        with contextlib.suppress(qcowlib.QcowlibError):
            step()

    def reads() -> None:
        with qcowlib.open(path, backing_policy="none") as disk:
            for n, _ in enumerate(disk.extents()):
                if n >= EXTENT_CAP:
                    break
            size = disk.virtual_size
            disk.read(0, min(size, READ_CAP))
            disk.read(size // 2, min(size - size // 2, READ_CAP))
            disk.read(max(0, size - 4096), min(size, 4096))

    out = path + ".out"
    guarded(lambda: qcowlib.info(path, backing_policy="none"))
    guarded(reads)
    guarded(lambda: qcowlib.check(path, backing_policy="none"))
    guarded(lambda: qcowlib.validate(path))
    try:
        guarded(lambda: qcowlib.convert(path, out, "raw", backing_policy="none"))
    finally:
        Path(out).unlink(missing_ok=True)
    # Last, as they write (the case is a copy): in-place changes, repair, check again.
    guarded(lambda: write_in_place(path))
    guarded(lambda: qcowlib.create_snapshot(path, "fuzz"))
    guarded(lambda: qcowlib.amend(path, {"refcount_bits": "16"}))
    guarded(lambda: qcowlib.check(path, repair="all", backing_policy="none"))
    guarded(lambda: qcowlib.check(path, backing_policy="none"))


def write_in_place(path: str) -> None:
    """Guest writes through the in-place writer (qcow2 only; others refuse)."""
    import qcowlib

    with qcowlib.open_rw(path, backing_policy="none") as disk:
        size = disk.virtual_size
        for offset in (0, size // 3, max(0, size - 512)):
            disk.write(offset, b"\xa5" * min(size - offset, 8192))


def one_case(path: Path) -> str | None:
    """Run :func:`exercise` in a child; the defect it showed, or None."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        signal.alarm(ALARM_SECONDS)
        code = 0
        try:
            exercise(str(path))
        except BaseException:
            os.write(w, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        report = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status == 0:
        return None
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        what = "hang (alarm)" if sig == signal.SIGALRM else f"killed by signal {sig}"
        return report + what
    return report or f"exit status {os.WEXITSTATUS(status)}"


def campaign(seeds: list[Path], out: Path, *, seed: int, seconds: float, cases: int) -> int:
    """Mutate and exercise until the time or case budget is spent; the number of defects."""
    import qcowlib  # noqa: F401  (imported once: children fork with it loaded)

    rng = random.Random(seed)
    originals = [(p.name, p.read_bytes()) for p in seeds]
    out.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + seconds
    done = bad = 0
    with tempfile.TemporaryDirectory(prefix="qcowlib-fuzz-") as tmp:
        while done < cases and time.monotonic() < end:
            name, data = rng.choice(originals)
            case = Path(tmp) / name
            case.write_bytes(mutate(data, rng))
            done += 1
            defect = one_case(case)
            if defect is None:
                continue
            bad += 1
            keep = out / f"{done:06d}-{name}"
            shutil.copyfile(case, keep)
            keep.with_name(keep.name + ".txt").write_text(defect)
            last = defect.strip().splitlines()[-1] if defect.strip() else defect
            print(f"defect {keep}: {last}", flush=True)
    print(f"{done} cases, {bad} defects (seed {seed})")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="time budget")
    parser.add_argument("--cases", type=int, default=1 << 62, help="case budget")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    parser.add_argument("--out", type=Path, default=Path("fuzz-defects"), help="defects here")
    parser.add_argument("--seeds", type=Path, default=None, help="seed images (default: made)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    with tempfile.TemporaryDirectory(prefix="qcowlib-seeds-") as tmp:
        seeds = sorted(args.seeds.iterdir()) if args.seeds else make_seeds(Path(tmp))
        bad = campaign(seeds, args.out, seed=seed, seconds=args.seconds, cases=args.cases)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
