"""Backing policies (follow, contained, none), special files, and deep chains.

Reads are checked against qemu-img's own conversion of the same files wherever qemu-img
can express the policy (``follow`` is its behaviour; ``none`` is its ``"backing": null``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

import qcowlib
from qcowlib.core.chain import BackingPolicy
from tests.conftest import cli, qemu_img, qemu_io
from tests.core.chains import (
    deadline,
    make_chain,
    overlay,
    special_files,
    vmdk_descriptor,
)

pytestmark = pytest.mark.usefixtures("qemu")

POLICIES = ("follow", "contained", "none")


def read_all(path: Path, policy: str) -> bytes:
    with qcowlib.open(str(path), backing_policy=policy) as disk:
        return disk.read(0, disk.virtual_size)


def qemu_raw(tmp_path: Path, spec: str) -> bytes:
    out = tmp_path / "qemu-oracle.raw"
    qemu_img("convert", "-O", "raw", spec, out)
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the images' one, holding a 'secret' raw file."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.raw").write_bytes(b"S" * (1 << 20))
    return d


@pytest.fixture
def imgdir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


# -- contained -----------------------------------------------------------------------------


def test_contained_reads_a_relative_chain_inside_the_directory(imgdir: Path) -> None:
    (imgdir / "sub").mkdir()
    base = imgdir / "sub" / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_io(base, "qcow2", "write -P 3 0 8k")
    mid = imgdir / "sub" / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    top = imgdir / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "sub/mid.qcow2", "-F", "qcow2", top)
    qemu_io(top, "qcow2", "write -P 4 4k 4k")
    expected = qemu_raw(imgdir, str(top))
    assert read_all(top, "contained") == expected == read_all(top, "follow")


@pytest.mark.parametrize(
    ("name", "setup", "why"),
    [
        ("link", lambda d, o: os.symlink(o / "secret.raw", d / "link"), "outside"),
        ("dir/secret.raw", lambda d, o: os.symlink(o, d / "dir"), "outside"),
        ("../outside/secret.raw", lambda d, o: None, "leaves the image's directory"),
        ("ABS", lambda d, o: None, "absolute path"),
    ],
    ids=["symlink-to-file", "symlinked-directory", "dot-dot", "absolute"],
)
def test_contained_refuses_names_that_leave_the_directory(
    imgdir: Path, outside: Path, name: str, setup: object, why: str
) -> None:
    assert callable(setup)
    setup(imgdir, outside)
    if name == "ABS":
        name = str(outside / "secret.raw")
    top = overlay(imgdir / "top.qcow2", name)
    # qemu-img (follow) reads the outside file through the overlay, and so do we ...
    assert read_all(top, "follow") == qemu_raw(imgdir, str(top)) == b"S" * (1 << 20)
    # ... but contained refuses it, naming the image and the file
    with pytest.raises(qcowlib.UnsafeBackingPath, match=why) as err:
        read_all(top, "contained")
    assert err.value.file == str(top) and name in str(err.value)
    res = cli("convert", "--backing-policy", "contained", "-O", "raw", top, imgdir / "o.raw")
    assert res.returncode == 1 and str(top) in res.stderr and name in res.stderr
    assert res.stderr.count("\n") == 1 and not (imgdir / "o.raw").exists()


def test_contained_refuses_a_symlink_in_a_deeper_layer(imgdir: Path, outside: Path) -> None:
    os.symlink(outside / "secret.raw", imgdir / "link")
    overlay(imgdir / "mid.qcow2", "link")
    top = overlay(imgdir / "top.qcow2", "mid.qcow2", "qcow2")
    with pytest.raises(qcowlib.UnsafeBackingPath) as err:
        read_all(top, "contained")
    # the top image is the one named, with the layer and the name at fault
    assert err.value.file == str(top)
    assert "mid.qcow2" in err.value.message and "'link'" in err.value.message


def test_contained_needs_a_recorded_backing_format(imgdir: Path) -> None:
    qemu_img("create", "-q", "-f", "raw", imgdir / "base.raw", "1M")
    top = overlay(imgdir / "top.qcow2", "base.raw", None)
    assert qemu_img("info", "--output", "json", top).stdout.count("backing-filename-format") == 0
    assert read_all(top, "follow") == bytes(1 << 20)  # probed, as qemu-img does
    with pytest.raises(qcowlib.BackingFormatUnknown, match="no recorded format") as err:
        read_all(top, "contained")
    assert err.value.file == str(top)


# -- none ----------------------------------------------------------------------------------


def test_none_reads_the_top_image_alone(imgdir: Path) -> None:
    top = make_chain(imgdir, 3)
    qemu_io(top, "qcow2", "write -P 9 64k 4k")
    alone = qemu_raw(
        imgdir,
        "json:"
        + json.dumps(
            {"driver": "qcow2", "file": {"driver": "file", "filename": str(top)}, "backing": None}
        ),
    )
    got = read_all(top, "none")
    assert got == alone
    assert got[64 << 10 : 68 << 10] == b"\x09" * 4096
    assert got[512 << 10 : 516 << 10] == bytes(4096)  # only the base wrote here
    assert qemu_raw(imgdir, str(top))[512 << 10 : 516 << 10] == b"\x01" * 4096
    # map: everything the top image leaves unallocated reads as zeros at depth 0
    with qcowlib.open(str(top), backing_policy="none") as disk:
        assert disk.backing is None and [d.filename for d in disk.chain] == [str(top)]
    # info still shows the backing file's name, as qemu-img info does
    ours = json.loads(cli("info", "--backing-policy", "none", "--output", "json", top).stdout)
    theirs = json.loads(qemu_img("info", "--output", "json", top).stdout)
    assert ours["backing-filename"] == theirs["backing-filename"] == "l0001.qcow2"
    assert ours["full-backing-filename"] == theirs["full-backing-filename"]


def test_none_still_keeps_data_and_extent_files_inside(imgdir: Path, outside: Path) -> None:
    desc = vmdk_descriptor(imgdir / "d.vmdk", str(outside / "secret.raw"))
    assert read_all(desc, "follow") == b"S" * (1 << 20)
    for policy in ("contained", "none"):
        with pytest.raises(qcowlib.UnsafeBackingPath, match="absolute"):
            read_all(desc, policy)


def test_api_policy_names_and_objects(imgdir: Path) -> None:
    top = make_chain(imgdir, 2)
    with qcowlib.open(str(top), backing=BackingPolicy(follow=False)) as disk:
        assert disk.backing is None
    assert BackingPolicy.named("contained").name == "contained"
    assert BackingPolicy.named("none", force_share=True).name == "none"
    with pytest.raises(qcowlib.InvalidArgument, match="unknown backing policy"):
        qcowlib.open(str(top), backing_policy="sometimes")
    res = cli("info", "--backing-policy", "sometimes", top)
    assert res.returncode == 2


# -- special files -------------------------------------------------------------------------


def _special_cases(d: Path) -> list[tuple[str, Path, str]]:
    """(kind, image, how) for every special file named as backing, data and extent file."""
    cases = []
    for kind, target in special_files(d).items():
        slug = kind.strip("/").replace("/", "-")
        link = d / f"link-{slug}"
        os.symlink(target, link)
        for how, name in (("direct", target), ("symlink", link.name)):
            cases.append((kind, overlay(d / f"b-{slug}-{how}.qcow2", name), f"backing {how}"))
            cases.append((kind, vmdk_descriptor(d / f"e-{slug}-{how}.vmdk", name), f"extent {how}"))
        # an external data file (named by a qcow2 that was made with a regular one)
        img = d / f"df-{slug}.qcow2"
        opts = f"data_file=df-{slug}.raw"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, img.name, "1M"],
            cwd=d,
            check=True,
        )
        os.unlink(d / f"df-{slug}.raw")
        os.symlink(target, d / f"df-{slug}.raw")
        cases.append((kind, img, "data file"))
    return cases


def test_special_files_are_never_opened(imgdir: Path) -> None:
    cases = _special_cases(imgdir)
    assert len(cases) == 7 * 5
    for kind, image, how in cases:
        for policy in POLICIES:
            if policy == "none" and how.startswith("backing"):
                continue  # not opened at all under none
            with deadline(20), pytest.raises(qcowlib.QcowlibError) as err:
                read_all(image, policy)
            text = str(err.value)
            assert str(image) in text, (kind, how, policy, text)
            if policy == "follow":  # under contained most are refused as outside
                assert "never opened" in text or "is a directory" in text, (kind, how, text)


def test_special_files_through_the_cli_do_not_hang(imgdir: Path) -> None:
    specials = special_files(imgdir)
    top = overlay(imgdir / "top.qcow2", specials["fifo"])
    started = time.monotonic()
    res = cli("convert", "-O", "raw", top, imgdir / "o.raw")
    assert res.returncode == 1 and "FIFO" in res.stderr and str(top) in res.stderr
    assert time.monotonic() - started < 20
    # qemu-img itself reads /dev/zero as a backing file; we refuse it
    top = overlay(imgdir / "zero.qcow2", "/dev/zero")
    assert qemu_img("convert", "-O", "raw", top, imgdir / "q.raw").returncode == 0
    res = cli("map", "--output", "json", top)
    assert res.returncode == 1 and "character device" in res.stderr


# -- deep chains ---------------------------------------------------------------------------


#: The 1,000-deep case is benchmark-sized (qemu-img's own convert of it, the oracle, takes
#: 3-40 s on a shared machine): run it with QCOWLIB_DEEP_CHAIN=1.
DEEP = pytest.mark.skipif(
    not os.environ.get("QCOWLIB_DEEP_CHAIN"), reason="set QCOWLIB_DEEP_CHAIN=1 to run"
)


@pytest.mark.parametrize("depth", [200, pytest.param(1000, marks=[pytest.mark.slow, DEEP])])
def test_deep_chain_converts_like_qemu_img(tmp_path: Path, depth: int) -> None:
    top = make_chain(tmp_path / "c", depth)
    out = tmp_path / "out.raw"
    qcowlib.convert(str(top), str(out), "raw")
    assert out.read_bytes() == qemu_raw(tmp_path, str(top))
    flat = tmp_path / "flat.qcow2"
    res = cli("flatten", top, flat)
    assert res.returncode == 0, res.stderr
    assert f"reading {depth} images" in res.stderr and "more ..." in res.stderr
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", flat, out).returncode == 0


def test_chain_depth_cap_names_the_top_image(tmp_path: Path) -> None:
    top = make_chain(tmp_path / "c", 12)
    with pytest.raises(qcowlib.BackingTooDeep, match="deeper than 10") as err:
        qcowlib.open(str(top), backing_policy=BackingPolicy(max_depth=10))
    # the tenth image (l0002) may not name an eleventh
    assert err.value.file == str(top) and "l0002.qcow2" in err.value.message


def test_missing_layer_deep_in_the_chain_names_the_top_image(tmp_path: Path) -> None:
    top = make_chain(tmp_path / "c", 6)
    (tmp_path / "c" / "l0002.qcow2").unlink()
    res = cli("info", "--backing-chain", top)
    assert res.returncode == 1
    line = res.stderr.strip()
    assert line.startswith(f"qcowlib: error: {top}:") and "l0002.qcow2" in line
    assert "l0003.qcow2" in line  # the image that names it


# -- what flatten and upload --flatten say about the chain ---------------------------------


def test_flatten_reports_the_chain_only_when_there_is_one(tmp_path: Path) -> None:
    top = make_chain(tmp_path / "c", 3)
    res = cli("flatten", top, tmp_path / "f.qcow2")
    assert res.returncode == 0
    names = [line.strip() for line in res.stderr.splitlines()[1:]]
    assert res.stderr.startswith("reading 3 images (top first):")
    assert names == [f"{tmp_path / 'c' / f'l000{i}.qcow2'} (qcow2)" for i in (2, 1, 0)]
    base = tmp_path / "c" / "l0000.qcow2"
    assert cli("flatten", base, tmp_path / "g.qcow2").stderr == ""  # a lone image
    assert "reading 1 image " in cli("flatten", "-p", base, tmp_path / "g.qcow2").stderr
    res = cli("flatten", "--backing-policy", "none", top, tmp_path / "h.qcow2")
    assert res.returncode == 0 and res.stderr == ""


def test_upload_flatten_source_follows_the_policy(tmp_path: Path, outside: Path) -> None:
    from qcowlib.glance.request import UploadRequest
    from qcowlib.glance.transfer import Source as _Source

    top = make_chain(tmp_path / "c", 2)
    seen: list[list[tuple[str, str]]] = []
    for policy, depth in (("follow", 2), ("none", 1)):
        req = UploadRequest(str(top), "x", flatten=True, backing_policy=policy)
        src = _Source(req, "qcow2")
        seen.append(src.chain)
        src.close()
        assert len(seen[-1]) == depth
    os.symlink(outside / "secret.raw", tmp_path / "c" / "link")
    evil = overlay(tmp_path / "c" / "evil.qcow2", "link")
    req = UploadRequest(str(evil), "x", flatten=True, backing_policy="contained")
    with pytest.raises(qcowlib.UnsafeBackingPath):
        _Source(req, "qcow2")


def test_a_backing_file_name_that_is_not_utf8_is_followed_as_qemu_img_follows_it(
    tmp_path: Path,
) -> None:
    """A backing file named in another encoding (Latin-1 "café.qcow2") was refused as
    "backing file name is not valid UTF-8": no info, no convert.  The name is bytes on
    disk, as for qemu-img; JSON shows the odd byte as U+FFFD, as qemu-img's does."""
    base = os.path.join(os.fsencode(tmp_path), "caf\xe9.qcow2".encode("latin-1"))
    top = tmp_path / "top.qcow2"
    subprocess.run([b"qemu-img", b"create", b"-q", b"-f", b"qcow2", base, b"4M"], check=True)
    qemu_io(os.fsdecode(base), "qcow2", "write -P 5 0 1M")
    name = "caf\xe9.qcow2".encode("latin-1")
    subprocess.run(
        [b"qemu-img", b"create", b"-q", b"-f", b"qcow2", b"-b", name, b"-F", b"qcow2",
         os.fsencode(top)],
        check=True,
    )  # fmt: skip
    qemu_io(top, "qcow2", "write -P 6 2M 1M")
    assert read_all(top, "follow") == qemu_raw(tmp_path, str(top))
    ref = json.loads(qemu_img("info", "--output=json", top).stdout)
    ours = json.loads(cli("info", "--output=json", top).stdout)
    assert ours["backing-filename"] == ref["backing-filename"] == "caf\ufffd.qcow2"
    res = cli("rebase", "-u", "-b", os.fsdecode(name), "-F", "qcow2", top)
    assert res.returncode == 0, res.stderr
    assert name in top.read_bytes()
    res = cli("commit", top)
    assert res.returncode == 0, res.stderr
    assert qemu_img("check", os.fsdecode(base)).returncode == 0
