"""LUKS volumes and LUKS-encrypted qcow2 against qemu-img on the same images.

Without a key, ``info`` must equal qemu-img's (human and JSON) and everything that
reads data must fail as qemu-img fails; with the key given the qemu-img way
(``--object secret`` + ``--image-opts``), ``map`` and the converted bytes must equal
qemu-img's.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowlib.core.qdict import qdict_order
from qcowlib.errors import QcowlibError
from qcowlib.formats.luks import codec
from qcowlib.formats.luks.probe import LUKS_MAGIC
from tests.conftest import cli, qemu_img, require_qemu

SECRET = "sekrit"
OBJECT = f"secret,id=sec0,data={SECRET}"


def _make(path: Path, fmt: str, *options: str, size: str = "4M") -> Path:
    """qemu-img create with a key; retried: qemu's PBKDF2 timing probe fails under load
    ("Unable to get accurate CPU usage")."""
    key = "encrypt.key-secret" if fmt == "qcow2" else "key-secret"
    iters = "encrypt.iter-time" if fmt == "qcow2" else "iter-time"
    opts = ",".join([f"{key}=sec0", f"{iters}=10", *options])
    err = ""
    for _ in range(10):
        out = subprocess.run(
            ["qemu-img", "create", "-q", "-f", fmt, "--object", OBJECT, "-o", opts, path, size],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode == 0:
            return path
        err = out.stderr
    pytest.skip(f"qemu-img could not create the image here: {err.strip()}")


def _opts(path: Path, fmt: str) -> str:
    key = "encrypt.key-secret" if fmt == "qcow2" else "key-secret"
    return f"driver={fmt},file.filename={path},{key}=sec0"


def _write(path: Path, fmt: str, *cmds: str) -> None:
    args = ["qemu-io", "--object", OBJECT, "--image-opts"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, _opts(path, fmt)], check=True, capture_output=True)


IMAGES = [
    ("luks", ()),
    (
        "luks",
        (
            "cipher-alg=aes-128",
            "cipher-mode=cbc",
            "ivgen-alg=essiv",
            "ivgen-hash-alg=sha256",
            "hash-alg=sha1",
        ),
    ),
    ("luks", ("cipher-mode=cbc", "ivgen-alg=plain64")),
    ("luks", ("cipher-alg=aes-128", "ivgen-alg=plain")),  # AES-128-XTS, 32-bit IVs
    ("qcow2", ("encrypt.format=luks",)),
]


@pytest.mark.parametrize(("fmt", "options"), IMAGES)
def test_info_without_key_is_qemu_imgs(tmp_path: Path, fmt: str, options: tuple[str, ...]) -> None:
    require_qemu()
    path = _make(tmp_path / f"disk.{fmt}", fmt, *options)
    for args in ((), ("--output=json",)):
        ours = cli("info", *args, path)
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == qemu_img("info", *args, path).stdout
    assert "encrypted: yes" in cli("info", path).stdout


@pytest.mark.parametrize(("fmt", "options"), IMAGES)
def test_data_with_key_is_qemu_imgs(tmp_path: Path, fmt: str, options: tuple[str, ...]) -> None:
    require_qemu()
    path = _make(tmp_path / f"disk.{fmt}", fmt, *options)
    _write(path, fmt, "write -P 0x5a 4k 300k", "write -P 0x11 2M 65k")
    common = ["--object", OBJECT, "--image-opts"]
    ours = cli("map", "--output=json", *common, _opts(path, fmt))
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == qemu_img("map", "--output=json", *common, _opts(path, fmt)).stdout
    mine, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    assert cli("convert", *common, "-O", "raw", _opts(path, fmt), mine).returncode == 0
    qemu_img("convert", *common, "-O", "raw", _opts(path, fmt), theirs)
    assert mine.read_bytes() == theirs.read_bytes()
    assert mine.read_bytes()[4096:4100] == b"\x5a" * 4


@pytest.mark.parametrize("fmt", ["luks", "qcow2"])
def test_reading_without_key_fails_as_qemu_img(tmp_path: Path, fmt: str) -> None:
    require_qemu()
    path = _make(
        tmp_path / f"disk.{fmt}", fmt, *(("encrypt.format=luks",) if fmt == "qcow2" else ())
    )
    ours = cli("map", path)
    theirs = qemu_img("map", path, check=False)
    assert ours.returncode == theirs.returncode == 1
    expected = theirs.stderr.strip().rsplit(": ", 1)[-1]  # "Parameter '...' is required for cipher"
    assert expected in ours.stderr
    wrong = ["--object", "secret,id=sec0,data=nope", "--image-opts", _opts(path, fmt)]
    ours = cli("map", *wrong)
    assert ours.returncode == 1 and "Invalid password, cannot unlock any keyslot" in ours.stderr
    assert "Invalid password" in qemu_img("map", *wrong, check=False).stderr


def test_secret_from_a_file_and_in_base64(tmp_path: Path) -> None:
    require_qemu()
    path = _make(tmp_path / "disk.luks", "luks")
    _write(path, "luks", "write -P 0x77 0 64k")
    key_file = tmp_path / "key"
    key_file.write_text(SECRET)
    expected = qemu_img(
        "convert",
        "--object",
        OBJECT,
        "--image-opts",
        "-O",
        "raw",
        _opts(path, "luks"),
        tmp_path / "q.raw",
    )
    assert expected.returncode == 0
    b64 = base64.b64encode(SECRET.encode()).decode()
    for obj in (f"secret,id=sec0,file={key_file}", f"secret,id=sec0,data={b64},format=base64"):
        out = tmp_path / "o.raw"
        done = cli(
            "convert", "--object", obj, "--image-opts", "-O", "raw", _opts(path, "luks"), out
        )
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == (tmp_path / "q.raw").read_bytes()
    missing = cli("map", "--object", "secret,id=other,data=x", "--image-opts", _opts(path, "luks"))
    assert missing.returncode == 1 and "No secret with id 'sec0' found" in missing.stderr


def test_flatten_and_checksum_read_through_the_cipher(tmp_path: Path) -> None:
    require_qemu()
    path = _make(tmp_path / "disk.qcow2", "qcow2", "encrypt.format=luks")
    _write(path, "qcow2", "write -P 0x3c 1M 1M")
    common = ["--object", OBJECT, "--image-opts"]
    flat = tmp_path / "flat.qcow2"
    assert cli("flatten", *common, _opts(path, "qcow2"), flat).returncode == 0
    raw = tmp_path / "ref.raw"
    qemu_img("convert", *common, "-O", "raw", _opts(path, "qcow2"), raw)
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", flat, raw).returncode == 0
    digest = json.loads(
        cli("checksum", "--content", "--output=json", *common, _opts(path, "qcow2")).stdout
    )["content"]["md5"]
    assert digest == hashlib.md5(raw.read_bytes()).hexdigest()


# -- codecs ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=codec.HEADER_SIZE + 64), st.integers(0, 1 << 40))
def test_header_parses_or_raises_our_error(data: bytes, size: int) -> None:
    with contextlib.suppress(QcowlibError):
        codec.parse_header(data, size)


def _af_split(key: bytes, stripes: int, hash_name: str, noise: bytes) -> bytes:
    """AF_split from the LUKS spec (test side): stripes-1 random blocks, then the last."""
    n = len(key)
    d = bytes(n)
    blocks = [noise[i * n : (i + 1) * n] for i in range(stripes - 1)]
    for block in blocks:
        d = codec._diffuse(codec._xor(d, block), hash_name)
    return b"".join(blocks) + codec._xor(d, key)


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from([16, 32, 64]),
    st.integers(1, 40),
    st.sampled_from(["sha1", "sha256", "sha512"]),
    st.randoms(use_true_random=False),
)
def test_af_merge_undoes_af_split(n: int, stripes: int, hash_name: str, rng: object) -> None:
    key = os.urandom(n)
    noise = bytes(rng.getrandbits(8) for _ in range(n * (stripes - 1)))  # type: ignore[attr-defined]
    assert codec.af_merge(_af_split(key, stripes, hash_name, noise), n, stripes, hash_name) == key


def test_qdict_order_matches_qemu_img() -> None:
    # Orders observed in qemu-img 7.2's output (luks info, and its top-level keys).
    seen = [
        "ivgen-alg",
        "hash-alg",
        "cipher-alg",
        "uuid",
        "ivgen-hash-alg",
        "format",
        "cipher-mode",
        "slots",
        "payload-offset",
        "master-key-iters",
    ]
    assert list(qdict_order(dict.fromkeys(reversed(seen), 0))) == seen
    top = [
        "virtual-size",
        "filename",
        "cluster-size",
        "format",
        "actual-size",
        "format-specific",
        "encrypted",
        "dirty-flag",
    ]
    assert list(qdict_order(dict.fromkeys(sorted(top), 0))) == top


def test_truncated_or_foreign_headers_are_refused() -> None:
    header = bytearray(codec.HEADER_SIZE)
    header[:6] = LUKS_MAGIC
    struct.pack_into(">H", header, 6, 2)
    with pytest.raises(QcowlibError, match="LUKS version 2"):
        codec.parse_header(bytes(header), 1 << 20)
    with pytest.raises(QcowlibError):
        codec.parse_header(bytes(header[:100]), 1 << 20)


def test_keys_no_aes_takes_are_refused_as_qemu_img_refuses(tmp_path: Path) -> None:
    require_qemu()
    made = _make(tmp_path / "disk.luks", "luks", "cipher-mode=cbc", "ivgen-alg=essiv")
    image = made.read_bytes()
    mode = b"cbc-essiv:sha1".ljust(32, b"\0")  # a 20-byte ESSIV key
    key_bytes = struct.pack(">I", 20)  # a 20-byte master key
    for at, patch in ((40, mode), (108, key_bytes)):
        path = tmp_path / f"patched{at}.luks"
        path.write_bytes(image[:at] + patch + image[at + len(patch) :])
        theirs = qemu_img("info", path, check=False)
        ours = cli("info", path)
        assert theirs.returncode == ours.returncode == 1
        assert theirs.stderr.strip().rsplit(": ", 1)[-1] in ours.stderr
