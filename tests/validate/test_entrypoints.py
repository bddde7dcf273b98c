"""The ``qcowlib.validators`` group is listed as ``importlib.metadata`` lists it.

:mod:`qcowlib.validate.entrypoints` scans ``sys.path`` itself; every case here compares
its answer with ``importlib.metadata.entry_points(group=...)`` over the same path.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcowlib.validate import ENTRY_POINT_GROUP, entrypoints

GROUP = ENTRY_POINT_GROUP


def _dist(root: Path, dirname: str, text: str | None, name: str | None = None) -> None:
    info = root / dirname
    info.mkdir(parents=True)
    dist_name = name or dirname.partition("-")[0].rsplit(".", 1)[0]
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1\n")
    if text is not None:
        (info / "entry_points.txt").write_text(text)


def _oracle(path: list[str], monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    monkeypatch.setattr(sys, "path", path)
    importlib.invalidate_caches()
    return [(ep.name, ep.value) for ep in importlib.metadata.entry_points(group=GROUP)]


def _ours(path: list[str], monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    monkeypatch.setattr(sys, "path", path)
    return entrypoints.group_entries(GROUP)


def test_fake_site_dirs_agree_with_importlib_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _dist(
        a,
        "site_rules-1.0.dist-info",
        "# comment\n[console_scripts]\nx = y:z\n\n"
        f"[{GROUP}]\n  one = site_rules:one  \ntwo=site_rules.sub:obj.attr [extra]\n"
        "[other]\nthree = m:f\n",
    )
    _dist(a, "Other.Pkg-2.0.dist-info", f"[[{GROUP}]]\nfour = other_pkg:r\n")
    _dist(a, "legacy.egg-info", f"[{GROUP}]\nfive = legacy:r\n")
    _dist(a, "no_entry_points-1.dist-info", None)
    (a / "plain_file.egg-info").write_text("Name: plain-file\n")
    # The same distributions again later on the path: importlib.metadata keeps the first.
    _dist(b, "Site.Rules-9.0.dist-info", f"[{GROUP}]\nshadowed = x:y\n")
    _dist(b, "other_pkg-3.0.dist-info", f"[{GROUP}]\nshadowed-too = x:y\n")
    _dist(b, "plain_file-1.dist-info", f"[{GROUP}]\nshadowed-by-a-file = x:y\n")
    _dist(b, "fresh-1.dist-info", f"[ {GROUP} ]\nnot-this-group = x:y\n[{GROUP}]\nsix = f:g\n")
    path = [str(tmp_path / "missing"), str(a), str(b), ""]
    expected = _oracle(path, monkeypatch)
    assert sorted(n for n, _v in expected) == ["five", "four", "one", "six", "two"]
    assert _ours(path, monkeypatch) == expected
    assert entrypoints.scan(GROUP, path) == expected  # answered without the fallback


def test_zip_on_path_falls_back_to_importlib_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "site.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("zipped-1.0.dist-info/METADATA", "Name: zipped\nVersion: 1.0\n")
        z.writestr("zipped-1.0.dist-info/entry_points.txt", f"[{GROUP}]\nz = zipped:rule\n")
    path = [str(archive)]
    assert entrypoints.scan(GROUP, path) is None
    expected = _oracle(path, monkeypatch)
    assert expected == [("z", "zipped:rule")]
    assert _ours(path, monkeypatch) == expected


def test_egg_directory_and_upper_case_suffix_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    egg = tmp_path / "eggy-1.0-py3.11.egg"
    _dist(egg, "EGG-INFO", f"[{GROUP}]\negg = eggy:rule\n", name="eggy")
    upper = tmp_path / "upper"
    _dist(upper, "Loud-1.0.DIST-INFO", f"[{GROUP}]\nloud = loud:rule\n", name="loud")
    for path in ([str(egg)], [str(upper)]):
        assert entrypoints.scan(GROUP, path) is None
        expected = _oracle(path, monkeypatch)
        assert len(expected) == 1
        assert _ours(path, monkeypatch) == expected


def test_another_distribution_finder_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    class Finder:
        def find_spec(self, *args: object) -> None:
            return None

        def find_distributions(self, *args: object) -> list[object]:
            return []

    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    assert entrypoints.scan(GROUP, sys.path) is None


def test_the_real_sys_path_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    path = list(sys.path)
    assert _ours(path, monkeypatch) == _oracle(path, monkeypatch)


_lines = st.lists(
    st.one_of(
        st.sampled_from([f"[{GROUP}]", "[other]", f"[[{GROUP}]", "# c", "", "  ", "[]"]),
        st.builds(
            lambda n, v, sp: f"{sp}{n}{sp}={sp}{v}{sp}",
            st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
            st.from_regex(r"[a-z_.:\[\] ]{0,12}", fullmatch=True),
            st.sampled_from(["", " ", "\t"]),
        ),
        st.text(alphabet="ab=[]# \t", max_size=8),
    ),
    max_size=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=_lines, newline=st.sampled_from(["\n", "\r\n"]))
def test_entry_points_txt_parses_as_importlib_metadata_parses_it(
    monkeypatch: pytest.MonkeyPatch, lines: list[str], newline: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _dist(Path(tmp), "hyp-1.dist-info", None)
        (Path(tmp) / "hyp-1.dist-info" / "entry_points.txt").write_bytes(
            newline.join(lines).encode()
        )
        path = [tmp]
        try:
            expected: list[tuple[str, str]] | None = _oracle(path, monkeypatch)
        except TypeError:  # importlib.metadata: a line without "=" in a section
            expected = None
        if expected is None:
            with pytest.raises(ValueError):
                _ours(path, monkeypatch)
        else:
            assert _ours(path, monkeypatch) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("os.path", "os.path"),
        ("os.path:join", "join"),
        ("os:path.join", "join"),
        (" os : path.join [extra] ", None),
    ],
)
def test_load_is_entry_point_load(value: str, expected: str | None) -> None:
    ep = importlib.metadata.EntryPoint(name="x", value=value, group=GROUP)
    if expected is None:
        with pytest.raises(ValueError):
            entrypoints.load(value)
        with pytest.raises(AttributeError):
            ep.load()
        return
    assert entrypoints.load(value) is ep.load()
