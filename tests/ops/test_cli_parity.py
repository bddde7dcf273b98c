"""qemu-img options beyond the basics: dd, map ranges, convert -n/-W/-m/-t/-T,
--target-is-zero, compare -p/-q, check -q, each against qemu-img doing the same."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli, qemu_img

pytestmark = pytest.mark.usefixtures("qemu")


def io(path: Path, fmt: str, *cmds: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


@pytest.fixture
def img(tmp_path: Path) -> Path:
    path = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "3M")
    io(
        path,
        "qcow2",
        "write -P 1 0 100k",
        "write -c -P 2 512k 64k",
        "write -z 1M 64k",
        "write -P 3 1500k 3000",
        "write -P 4 3068k 4k",
    )
    return path


# -- dd ---------------------------------------------------------------------------------
DD_CASES = [
    [],
    ["bs=64k", "count=3", "skip=1"],
    ["bs=4k", "count=2k", "skip=1"],
    ["bs=3000", "count=2"],
    ["bs=1M", "skip=2"],
    ["bs=7", "count=100000", "skip=1000"],
    ["count=0"],
    ["bs=3M", "skip=1"],
]


@pytest.mark.parametrize("ops", DD_CASES, ids=lambda o: " ".join(o) or "defaults")
def test_dd_raw_byte_for_byte(ops: list[str], img: Path, tmp_path: Path) -> None:
    ours, ref = tmp_path / "ours.raw", tmp_path / "ref.raw"
    res = cli("dd", f"if={img}", f"of={ours}", *ops)
    assert res.returncode == 0, res.stderr
    qemu_img("dd", "-O", "raw", f"if={img}", f"of={ref}", *ops)
    assert ours.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("ops", DD_CASES[1:4], ids=" ".join)
def test_dd_qcow2_like_qemu(ops: list[str], img: Path, tmp_path: Path) -> None:
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    res = cli("dd", "-O", "qcow2", "-f", "qcow2", f"if={img}", f"of={ours}", *ops)
    assert res.returncode == 0, res.stderr
    qemu_img("dd", "-f", "qcow2", "-O", "qcow2", f"if={img}", f"of={ref}", *ops)
    assert qemu_img("check", ours).returncode == 0
    assert qemu_img("compare", "-s", ours, ref, check=False).returncode in (0, 1)
    assert qemu_img("compare", ours, ref).returncode == 0


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        (["of=x"], "Must specify both input and output files"),
        (["if=IMG", "of=x", "foo=1"], "unrecognized operand foo"),
        (["if=IMG", "of=x", "bs=0"], "Invalid bs specified"),
        (["if=IMG", "of=x", "count=1x"], "Invalid count specified"),
        (["if=IMG", "of=x", "skip=1000M"], "cannot skip to specified offset"),
    ],
)
def test_dd_refusals(ops: list[str], message: str, img: Path, tmp_path: Path) -> None:
    args = [o.replace("IMG", str(img)).replace("of=x", f"of={tmp_path / 'x'}") for o in ops]
    res = cli("dd", *args)
    assert res.returncode == 1 and message in res.stderr, res.stderr
    assert message in qemu_img("dd", *args, check=False).stderr
    assert not list(tmp_path.glob(".qcowlib-dd-*"))


# -- map ranges -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts",
    [
        ["--start-offset", "1000", "--max-length", "70000"],
        ["--start-offset", "1k"],
        ["--max-length", "1M"],
        ["--start-offset", "512k", "--max-length", "600k"],
        ["--start-offset", "100M"],
        ["--max-length", "0"],
        ["--start-offset=4096", "--max-length=3M"],
    ],
)
@pytest.mark.parametrize("output", ["json", "human"])
def test_map_ranges_like_qemu(opts: list[str], output: str, img: Path) -> None:
    res = cli("map", "--output", output, *opts, img)
    ref = qemu_img("map", "--output", output, *opts, img, check=False)
    # human output stops (exit 1) at the compressed cluster, in both
    assert (res.returncode, res.stdout) == (ref.returncode, ref.stdout)


@pytest.mark.parametrize("opt", ["--start-offset", "--max-length"])
def test_map_refuses_negative(opt: str, img: Path) -> None:
    res = cli("map", opt, "-1", img)
    assert res.returncode == 1 and "Invalid" in res.stderr
    assert qemu_img("map", opt, "-1", img, check=False).returncode == 1


# -- convert -n and friends ---------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_into_existing(fmt: str, img: Path, tmp_path: Path) -> None:
    target = tmp_path / f"t.{fmt}"
    qemu_img("create", "-q", "-f", fmt, target, "4M")
    io(target, fmt, "write -P 9 0 4M")  # old content everywhere: zeros must be written
    res = cli("convert", "-n", "-O", fmt, "-W", "-m", "16", "-t", "none", "-T", "writeback",
              img, target)  # fmt: skip
    assert res.returncode == 0, res.stderr
    if fmt == "qcow2":
        assert qemu_img("check", target).returncode == 0
    ref = tmp_path / "ref.raw"
    qemu_img("create", "-q", "-f", "raw", ref, "4M")
    io(ref, "raw", "write -P 9 0 4M")
    qemu_img("convert", "-n", "-O", "raw", img, ref)
    assert qemu_img("compare", "-f", fmt, "-F", "raw", target, ref).returncode == 0


def test_convert_target_is_zero(img: Path, tmp_path: Path) -> None:
    target = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", target, "3M")
    res = cli("convert", "-n", "--target-is-zero", "-O", "qcow2", img, target)
    assert res.returncode == 0, res.stderr
    assert qemu_img("compare", img, target).returncode == 0
    assert qemu_img("check", target).returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-is-zero"], "--target-is-zero requires use of -n flag"),
        (["-m", "17"], "Invalid number of coroutines"),
        (["-m", "0"], "Invalid number of coroutines"),
        (["-t", "foo"], "Invalid cache option: foo"),
        (["-T", "foo"], "Invalid source cache option: foo"),
    ],
)
def test_convert_refusals_like_qemu(
    args: list[str], message: str, img: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o.raw"
    res = cli("convert", *args, "-O", "raw", img, out)
    assert res.returncode == 1 and message in res.stderr, res.stderr
    ref = qemu_img("convert", *args, "-O", "raw", img, out, check=False)
    assert ref.returncode == 1 and message in ref.stderr


def test_convert_n_smaller_target_refused(img: Path, tmp_path: Path) -> None:
    target = tmp_path / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", target, "1M")
    res = cli("convert", "-n", "-O", "qcow2", img, target)
    assert res.returncode == 1 and "output file is smaller than input file" in res.stderr
    assert qemu_img("convert", "-n", "-O", "qcow2", img, target, check=False).returncode == 1


@pytest.mark.parametrize("mode", ["none", "off", "writeback", "writethrough", "directsync",
                                  "unsafe"])  # fmt: skip
def test_cache_modes_accepted(mode: str, img: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.qcow2"
    res = cli("convert", "-q", "-p", "-t", mode, "-T", mode, "-O", "qcow2", img, out)
    assert res.returncode == 0, res.stderr
    assert res.stdout == res.stderr == ""
    assert qemu_img("compare", img, out).returncode == 0


# -- -q and -p ---------------------------------------------------------------------------
def test_compare_quiet_and_progress(img: Path, tmp_path: Path) -> None:
    other = tmp_path / "o.qcow2"
    qemu_img("convert", "-O", "qcow2", img, other)
    res = cli("compare", "-q", img, other)
    ref = qemu_img("compare", "-q", img, other, check=False)
    assert (res.returncode, res.stdout) == (ref.returncode, ref.stdout) == (0, "")
    res = cli("compare", "-p", img, other)
    assert res.returncode == 0 and "(100.00/100%)" in res.stderr
    assert res.stdout == "Images are identical.\n"
    io(other, "qcow2", "write -P 7 2M 512")
    res = cli("compare", "-q", img, other)
    assert (res.returncode, res.stdout) == (1, "")
    res = cli("compare", "-p", img, other)
    assert res.returncode == 1 and "/100%)" in res.stderr
    assert res.stdout == qemu_img("compare", img, other, check=False).stdout


def test_check_quiet(img: Path) -> None:
    for output in ("human", "json"):
        res = cli("check", "-q", "--output", output, img)
        ref = qemu_img("check", "-q", f"--output={output}", img, check=False)
        assert (res.returncode, res.stdout) == (ref.returncode, ref.stdout) == (0, "")


def test_flatten_and_snapshot_quiet(img: Path, tmp_path: Path) -> None:
    res = cli("flatten", "-q", "-p", img, tmp_path / "f.qcow2")
    assert res.returncode == 0 and res.stdout == res.stderr == ""
    res = cli("snapshot", "-q", "-c", "s", img)
    assert res.returncode == 0 and res.stdout == res.stderr == ""


@pytest.mark.parametrize(
    ("cmd", "flag", "status"),
    [
        (["check"], "-T", 1),
        (["compare"], "-T", 2),
        (
            [
                "rebase",
                "-u",
                "-b",
                "",
            ],
            "-t",
            1,
        ),
        (["rebase", "-u", "-b", ""], "-T", 1),
        (["commit"], "-t", 1),
        (["amend", "-o", "lazy_refcounts=on"], "-t", 1),
    ],
)
def test_cache_options_everywhere_like_qemu(
    cmd: list[str], flag: str, status: int, img: Path
) -> None:
    extra = [img] if cmd[0] == "compare" else []
    bad = cli(*cmd, flag, "foo", img, *extra)
    ref = qemu_img(*cmd, flag, "foo", img, *extra, check=False)
    assert bad.returncode == ref.returncode == status, bad.stderr
    assert "cache option: foo" in bad.stderr and "cache option: foo" in ref.stderr
    if cmd[0] != "commit":  # commit needs a backing file
        good = cli(*cmd, flag, "writeback", img, *extra)
        assert good.returncode == 0, good.stderr


def test_convert_n_probes_the_target(img: Path, tmp_path: Path) -> None:
    target = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", target, "4M")
    before = target.read_bytes()
    res = cli("convert", "-n", "-O", "raw", img, target)  # raw bytes over qcow2 metadata
    assert res.returncode == 1 and "is a qcow2 image" in res.stderr
    assert target.read_bytes() == before
    res = cli("convert", "-n", img, target)  # no -O: the target's own format
    assert res.returncode == 0, res.stderr
    assert qemu_img("compare", img, target).returncode == 0
    assert qemu_img("check", target).returncode == 0
