"""The format registry: the one list of formats, and what the CLI and API take from it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import qcowlib
from qcowlib.cli import INPUT_FORMATS, build_parser, parse_options
from qcowlib.errors import InvalidArgument, UnsupportedFeature
from qcowlib.formats import registry
from tests.conftest import cli, qemu_img, qemu_io, require_qemu

SRC = Path(__file__).resolve().parents[2] / "src" / "qcowlib"
FORMAT_NAMES = set(registry.known())

#: Modules that still spell out lists of format names, to be moved into the registry
#: (may only shrink: a new module listing formats fails the test below), and lists of
#: Glance's own ``disk_format`` vocabulary, which is not qcowlib's list of formats.
NOT_YET_FROM_REGISTRY = {
    "cli/cmd_upload.py": "Glance disk_format names",
    "validate/policy.py": "Glance disk_format names",
    "validate/rules/external.py": "the formats that can name a parent (a rule's scope)",
    "validate/formats.py": "inspector formats",
}


def _format_lists(path: Path) -> list[int]:
    """Line numbers of tuple/list/set literals naming three or more formats."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            names = {
                e.value
                for e in node.elts
                if isinstance(e, ast.Constant) and isinstance(e.value, str)
            }
            if len(names & FORMAT_NAMES) >= 3:
                lines.append(node.lineno)
    return lines


def test_only_the_registry_lists_formats() -> None:
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel == "formats/registry.py" or rel in NOT_YET_FROM_REGISTRY:
            continue
        offenders += [f"{rel}:{line}" for line in _format_lists(path)]
    assert offenders == []


def test_entries_are_consistent() -> None:
    names = [f.name for f in registry.FORMATS]
    assert len(names) == len(set(names))
    assert set(registry.readable()) <= set(registry.names()) <= set(registry.known())
    assert set(registry.flattenable()) <= set(registry.writable()) <= set(registry.readable())
    for name in registry.writable():
        driver = registry.by_name(name).output_driver()
        assert driver.name == name
    for name in registry.readable():
        assert callable(registry.by_name(name).opener())
    for name in registry.creatable():
        assert callable(registry.by_name(name).implementation("create"))
    for entry in registry.FORMATS:
        for part in ("resize", "writer", "check"):
            if getattr(entry, part) is not None:
                assert callable(entry.implementation(part))


def test_probes_and_measures_come_from_the_formats() -> None:
    from qcowlib.core.measure import SizeMeasure

    for entry in registry.FORMATS:
        for _, ref in entry.probes:
            module = ref.partition(":")[0]
            assert module.startswith("qcowlib.formats.") and module.endswith(".probe"), ref
        if entry.measure is not None:
            assert isinstance(entry.implementation("measure"), SizeMeasure)
    order = registry.probe_order()
    assert {name for name, _ in order} == set(registry.known())
    ranks = [rank for f in registry.FORMATS for rank, _ in f.probes]
    assert len(ranks) == len(set(ranks))  # the order never depends on the entries' order
    last = order[-1][1]
    assert last(b"QFI\xfb\0\0\0\x09", b"", 8) is not None  # the catch-all is asked last


def test_glance_names_and_upload_targets() -> None:
    assert registry.glance_disk_format("vpc") == "vhd"
    assert registry.glance_disk_format("qcow2") == "qcow2"
    assert registry.glance_disk_format("iso") == "iso"
    targets = registry.upload_targets()
    assert set(targets) == {registry.glance_disk_format(n) for n in registry.flattenable()}
    assert targets["vmdk"] == {"subformat": "streamOptimized"}


def test_unknown_and_unreadable_formats() -> None:
    with pytest.raises(InvalidArgument, match="Unknown file format 'qcow3'"):
        registry.by_name("qcow3")
    with pytest.raises(UnsupportedFeature, match="xyz images are not supported"):
        registry.Format("xyz", "an entry with no reader").opener()
    with pytest.raises(UnsupportedFeature, match="converting to luks"):
        registry.by_name("luks").output_driver()
    assert registry.by_name("iso").opener() is registry.by_name("raw").opener()


def test_cli_choices_come_from_the_registry() -> None:
    assert registry.readable() == INPUT_FORMATS
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert isinstance(sub.choices, dict)
    choices = {
        name: {a.dest: a.choices for a in p._actions if a.choices}
        for name, p in sub.choices.items()
    }
    assert tuple(choices["create"]["format"]) == registry.creatable()
    assert tuple(choices["flatten"]["out_format"]) == registry.flattenable()
    assert tuple(choices["convert"]["format"]) == registry.readable()


def test_command_table_matches_what_modules_register() -> None:
    from qcowlib.cli import COMMANDS

    full = next(a for a in build_parser()._actions if a.dest == "command")
    assert isinstance(full.choices, dict)
    assert list(full.choices) == list(COMMANDS)
    for name in COMMANDS:
        one = next(a for a in build_parser(name)._actions if a.dest == "command")
        assert isinstance(one.choices, dict)
        assert name in one.choices


def test_formats_api_lists_the_registry() -> None:
    infos = qcowlib.formats()
    by_name = {i.name: i for i in infos}
    assert set(by_name) == set(registry.names())
    assert by_name["qcow2"].read and by_name["qcow2"].write and by_name["qcow2"].check
    assert by_name["raw"].create and not by_name["raw"].check
    assert by_name["vpc"].write and by_name["vpc"].stream  # one writer: files and streams
    assert by_name["luks"].read and not by_name["luks"].write and not by_name["luks"].check
    assert "formats" in dir(qcowlib)
    import qcowlib.formats.registry as again  # still a package with submodules

    assert again is registry
    assert qcowlib.formats()[0] == infos[0]


@pytest.mark.parametrize("fmt", registry.writable())
def test_option_help_lists_each_option(fmt: str) -> None:
    out = cli("convert", "-O", fmt, "-o", "help", "in", "out")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"Supported options for {fmt}:"
    listed = [line.split("=")[0].strip() for line in lines[1:]]
    assert listed == [o.name for o in registry.by_name(fmt).options]
    assert "size" in listed


def test_option_help_of_create_and_flatten() -> None:
    out = cli("create", "-f", "qcow2", "-o", "help", "x")
    assert out.returncode == 0 and "refcount_bits=<num>" in out.stdout
    out = cli("flatten", "-O", "vdi", "-o", "?", "x", "y")
    assert out.returncode == 0 and "static=<bool (on/off)>" in out.stdout


def test_option_commas_escape_as_in_qemu() -> None:
    assert parse_options("a=1,b=x,,y,c") == {"a": "1", "b": "x,y", "c": "on"}
    assert parse_options("backing_file=a,,,,b.img,backing_fmt=raw") == {
        "backing_file": "a,,b.img",
        "backing_fmt": "raw",
    }
    assert parse_options("x=a,,,b=2") == {"x": "a,", "b": "2"}


def test_backing_file_with_a_comma(tmp_path: Path) -> None:
    require_qemu()
    base = tmp_path / "a,b.raw"
    qemu_img("create", "-q", "-f", "raw", base, "1M")
    top = tmp_path / "top.qcow2"
    out = cli("create", "-q", "-f", "qcow2", "-o", "backing_file=a,,b.raw,backing_fmt=raw", top)
    assert out.returncode == 0, out.stderr
    info = qemu_img("info", "--output=json", top).stdout
    assert '"backing-filename": "a,b.raw"' in info


_LIGHT = ("numpy", "concurrent.futures", "openstack", "construct")
#: What validate must not load either: the entry points are listed by a scan of sys.path.
_LIGHT_VALIDATE = (*_LIGHT, "importlib.metadata")


@pytest.mark.parametrize(
    ("command", "heavy", "data"),
    [
        (["info"], _LIGHT, True),
        (["info", "--output=json"], ("numpy", "concurrent.futures", "openstack", "logging"), True),
        (["map"], (*_LIGHT, "dataclasses"), True),
        (["map", "--output=json"], (*_LIGHT, "dataclasses"), True),
        (["check"], _LIGHT, True),
        (["check", "--output=json"], _LIGHT, True),
        (["validate"], _LIGHT_VALIDATE, True),
        (["validate", "--output=json"], _LIGHT_VALIDATE, False),
        (["validate", "--list-rules"], _LIGHT_VALIDATE, False),
        (["validate", "--help"], _LIGHT_VALIDATE, False),
        (["--help"], _LIGHT_VALIDATE, False),
        (["info", "--help"], _LIGHT, False),
    ],
)
def test_metadata_commands_start_light(
    tmp_path: Path, command: list[str], heavy: tuple[str], data: bool
) -> None:
    """DESIGN.md: metadata-only commands (and ``map``, ``check`` and ``validate`` of a
    small qcow2, data in it or not) import neither numpy nor thread pools nor
    openstacksdk."""
    require_qemu()
    image = tmp_path / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1G")
    if data:  # a few L2 tables, a zero cluster
        qemu_io(image, "qcow2", "write -P 1 0 1M", "write -P 2 600M 64k", "write -z 1M 64k")
    args = command if "--help" in command or "--list-rules" in command else [*command, str(image)]
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qcowlib", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
    assert [m for m in heavy if m in loaded] == []
