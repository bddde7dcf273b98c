"""The public API is typed, discoverable and behaves like Python's own file objects.

CONTRACT.md: paths are ``str | os.PathLike``; every public function and class is typed
(no ``Any`` in a public signature), listed in ``__all__`` and visible to ``dir()`` and
``help()``; a missing file is also a ``FileNotFoundError``, a permission problem also a
``PermissionError``.
"""

from __future__ import annotations

import builtins
import inspect
import io
import os
import pydoc
import re
import shutil
import subprocess
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import qcowlib
from tests.conftest import qemu_img, qemu_io, require_qemu


def _public_callables() -> Iterator[tuple[str, Callable[..., object]]]:
    """(name, object) for every function, method and property getter ``__all__`` offers."""
    for name in qcowlib.__all__:
        obj = getattr(qcowlib, name)
        if isinstance(obj, types.ModuleType):  # qcowlib.validate / qcowlib.formats
            obj = getattr(obj, name)
        if inspect.isclass(obj):
            if issubclass(obj, BaseException):
                yield f"{name}.__init__", obj.__init__
                continue
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr not in ("__init__", "__call__"):
                    continue
                if isinstance(member, property) and member.fget is not None:
                    yield f"{name}.{attr}", member.fget
                elif isinstance(member, (staticmethod, classmethod)):
                    yield f"{name}.{attr}", member.__func__
                elif inspect.isfunction(member):
                    yield f"{name}.{attr}", member
        elif callable(obj):
            yield name, obj


class _Names(dict[str, object]):
    """Names for evaluating annotations: the module's, then builtins; a name imported
    only for type checkers stands for an opaque class (it cannot hide an ``Any``: the
    module that defines it is checked where it is public)."""

    def __init__(self, module_globals: dict[str, object]) -> None:
        super().__init__()
        self.module_globals = module_globals

    def __missing__(self, key: str) -> object:
        if key in self.module_globals:
            return self.module_globals[key]
        if hasattr(builtins, key):
            return getattr(builtins, key)
        if key == "Any":
            return typing.Any
        opaque = type(key, (), {"__class_getitem__": classmethod(lambda cls, _: cls)})
        self[key] = opaque
        return opaque


def _hints(obj: object) -> dict[str, object]:
    """``obj``'s annotations, evaluated (as ``typing.get_type_hints``, but names imported
    under ``TYPE_CHECKING`` do not stop it)."""
    module = sys.modules[getattr(obj, "__module__", "builtins")]
    names = _Names(vars(module))
    out: dict[str, object] = {}
    for key, value in inspect.get_annotations(obj).items():  # type: ignore[arg-type]
        out[key] = eval(value, {}, names) if isinstance(value, str) else value
    return out


def _mentions_any(hint: object) -> bool:
    if hint is typing.Any:
        return True
    return any(_mentions_any(arg) for arg in typing.get_args(hint))


def test_every_public_name_is_typed_without_any() -> None:
    problems = []
    for name, func in _public_callables():
        if getattr(func, "__module__", "").split(".")[0] != "qcowlib":
            continue  # inherited from the standard library (io, enum, dataclasses)
        hints = _hints(func)
        params = [
            p for p in inspect.signature(func).parameters.values() if p.name not in ("self", "cls")
        ]
        for p in params:
            if p.name not in hints:
                problems.append(f"{name}: parameter {p.name} has no annotation")
        if "return" not in hints and func.__name__ != "__init__":
            problems.append(f"{name}: no return annotation")
        for key, hint in hints.items():
            if _mentions_any(hint):
                problems.append(f"{name}: {key} is {hint}")
    for name in qcowlib.__all__:
        obj = getattr(qcowlib, name)
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for key, hint in _hints(obj).items():
                if not key.startswith("_") and _mentions_any(hint):
                    problems.append(f"{name}.{key} is {hint}")
    assert problems == []


def test_paths_are_str_or_pathlike() -> None:
    path_like = str | os.PathLike[str]
    for name in ("open", "open_rw", "check", "checksum", "info", "validate", "flatten_stream"):
        func = getattr(qcowlib, name)
        first = next(iter(inspect.signature(func).parameters.values()))
        hint = _hints(getattr(func, name, func))[first.name]
        assert set(typing.get_args(path_like)) <= set(typing.get_args(hint)), (name, hint)
    for name in ("convert", "flatten", "compare"):
        hints = _hints(getattr(qcowlib, name))
        params = list(inspect.signature(getattr(qcowlib, name)).parameters)[:2]
        for p in params:
            assert set(typing.get_args(path_like)) <= set(typing.get_args(hints[p])), name


def test_dir_and_help_list_every_public_name() -> None:
    code = (
        "import qcowlib, sys; names = dir(qcowlib); "
        "print(sorted(set(qcowlib.__all__) - set(names))); "
        "print([m for m in ('numpy', 'construct') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "[]"]  # listed before anything is loaded
    text = re.sub(".\b", "", pydoc.render_doc(qcowlib))  # without the bold
    for name in qcowlib.__all__:
        assert name in text, name


def test_signatures_are_the_real_ones() -> None:
    from qcowlib.validate.engine import validate

    assert inspect.signature(qcowlib.validate) == inspect.signature(validate)
    assert "policy" in inspect.signature(qcowlib.validate).parameters
    from qcowlib.formats import formats

    assert inspect.signature(qcowlib.formats) == inspect.signature(formats)
    for name in ("convert", "flatten", "measure", "check", "checksum", "info"):
        params = inspect.signature(getattr(qcowlib, name)).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), name


def test_measure_defaults_to_raw_as_the_cli() -> None:
    assert inspect.signature(qcowlib.measure).parameters["out_format"].default == "raw"
    assert qcowlib.measure(None, size=1 << 20) == qcowlib.measure(None, "raw", size=1 << 20)


def test_missing_file_is_also_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "missing.qcow2"
    for call in (
        lambda: qcowlib.open(missing),
        lambda: qcowlib.info(missing),
        lambda: qcowlib.checksum(missing),
        lambda: qcowlib.convert(missing, tmp_path / "out.raw"),
    ):
        with pytest.raises(FileNotFoundError) as caught:
            call()
        assert isinstance(caught.value, qcowlib.QcowlibFileNotFoundError)
        assert isinstance(caught.value, qcowlib.QcowlibError)
        assert caught.value.errno == 2
        assert caught.value.filename == str(missing)
    with pytest.raises(FileNotFoundError):
        qcowlib.convert(missing, tmp_path / "no-such-dir" / "out.raw")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_also_permission_error(tmp_path: Path) -> None:
    image = tmp_path / "secret.raw"
    image.write_bytes(bytes(4096))
    image.chmod(0)
    with pytest.raises(PermissionError) as caught:
        qcowlib.open(image)
    assert isinstance(caught.value, qcowlib.QcowlibPermissionError)


def test_refused_open_is_also_permission_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "secret.raw"
    image.write_bytes(bytes(4096))

    def refuse(path: str, flags: int, mode: int = 0o777) -> int:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "open", refuse)  # what a non-root user meets on mode 000
    with pytest.raises(PermissionError) as caught:
        qcowlib.open(image)
    assert isinstance(caught.value, qcowlib.QcowlibPermissionError)
    assert str(caught.value) == f"{image}: cannot open: Permission denied"


def test_permission_error_is_both() -> None:
    err = qcowlib.QcowlibPermissionError(file="x")
    assert isinstance(err, PermissionError) and isinstance(err, qcowlib.QcowlibIOError)
    assert err.errno == 13 and str(err) == "x: permission denied"


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    require_qemu()
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "qcow2", "write -P 0xb5 0 1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io(top, "qcow2", "write -P 0x0e 512k 128k")
    return top


def test_pathlib_paths_work(chain: Path, tmp_path: Path) -> None:
    with qcowlib.open(chain) as disk:
        assert disk.read(0, 1) == b"\xb5"
    assert qcowlib.info(chain)["format"] == "qcow2"
    qcowlib.convert(chain, tmp_path / "flat.raw")
    assert qcowlib.compare(chain, tmp_path / "flat.raw").identical
    assert qcowlib.check(chain).check_errors == 0
    assert qcowlib.checksum(chain)["size"] == chain.stat().st_size
    assert qcowlib.validate(tmp_path / "flat.raw", disk_format="raw").ok


def test_reading_a_closed_disk_says_so(chain: Path) -> None:
    disk = qcowlib.open(chain)
    disk.close()
    for call in (
        lambda: disk.read(0, 512),
        lambda: disk.read_into(0, bytearray(512)),
        lambda: list(disk.extents()),
    ):
        with pytest.raises(qcowlib.DiskClosed, match="disk is closed"):
            call()
    with pytest.raises(ValueError):  # as a closed Python file
        disk.read(0, 1)
    disk.close()  # twice is fine
    rw = qcowlib.open_rw(chain)
    rw.close()
    with pytest.raises(qcowlib.DiskClosed):
        rw.write(0, b"x" * 512)


def test_reprs_are_informative(chain: Path) -> None:
    with qcowlib.open(chain) as disk:
        text = repr(disk)
        assert "qcow2" in text and "top.qcow2" in text and str(4 << 20) in text
        assert "base.qcow2" in text
    assert "closed" in repr(disk)
    report = qcowlib.check(chain)
    assert "top.qcow2" in repr(report) and "no errors" in repr(report)
    vreport = qcowlib.validate(chain, disk_format="qcow2")
    assert "rejected" in repr(vreport) and "backing-file" in repr(vreport)
    with qcowlib.flatten_stream(chain) as stream:
        assert f"size={stream.size}" in repr(stream)


def _flat_file(chain: Path, tmp_path: Path) -> bytes:
    out = tmp_path / "flat.qcow2"
    qcowlib.flatten(chain, out)
    return out.read_bytes()


def test_flatten_stream_is_a_readable_binary_file(chain: Path, tmp_path: Path) -> None:
    expected = _flat_file(chain, tmp_path)
    with qcowlib.flatten_stream(chain) as stream:
        assert isinstance(stream, io.RawIOBase)
        assert stream.readable() and not stream.seekable() and not stream.writable()
        assert len(stream) == stream.size == len(expected)
        sink = io.BytesIO()
        shutil.copyfileobj(stream, sink, 10_000)
        assert sink.getvalue() == expected
        assert stream.read(10) == b""  # end of stream, as a file
    assert stream.closed
    with pytest.raises(qcowlib.DiskClosed):
        stream.read(1)


def test_flatten_stream_under_a_buffered_reader(chain: Path, tmp_path: Path) -> None:
    expected = _flat_file(chain, tmp_path)
    with io.BufferedReader(qcowlib.flatten_stream(chain), buffer_size=8192) as reader:
        head = reader.read(7)
        rest = reader.read()
    assert head + rest == expected


def test_flatten_stream_read_then_iterate(chain: Path, tmp_path: Path) -> None:
    expected = _flat_file(chain, tmp_path)
    stream = qcowlib.flatten_stream(chain)
    buf = bytearray(1000)
    assert stream.readinto(buf) == 1000
    rest = b"".join(stream)  # the chunks after what was read
    assert bytes(buf) + rest == expected
    assert stream.closed


def test_validation_rules_api_and_cli() -> None:
    rules = qcowlib.validation_rules()
    names = [r.name for r in rules]
    assert "backing-file" in names and "structure" in names
    assert {r.severity for r in rules} <= {"error", "warning"}
    assert all(r.description for r in rules)
    from qcowlib.validate import builtin_rules

    assert names[: len(builtin_rules())] == [r.id for r in builtin_rules()]
    from tests.conftest import cli

    out = cli("validate", "--list-rules", "--output", "json")
    assert out.returncode == 0, out.stderr
    import json

    listed = json.loads(out.stdout)
    assert [r["rule"] for r in listed] == names
    assert [r["severity"] for r in listed] == [r.severity for r in rules]
    human = cli("validate", "--list-rules")
    assert human.returncode == 0
    for name in names:
        assert name in human.stdout


def test_version_has_one_source() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("qcowlib")
    except PackageNotFoundError:  # pragma: no cover - a source tree without metadata
        pytest.skip("qcowlib is not installed")
    assert installed == qcowlib.__version__
    from tests.conftest import cli

    assert cli("--version").stdout.strip() == f"qcowlib {qcowlib.__version__}"
