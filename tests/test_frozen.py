"""qcowlib._frozen.record: what a frozen dataclass gives its users, without dataclasses."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import subprocess
import sys
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcowlib._frozen import FrozenInstanceError, field, fields, record, replace


@record
class Point:
    """A record for the tests (module level, so that it pickles)."""

    x: int
    y: int = 0
    tags: tuple[str, ...] = ()
    note: str = field(default="", compare=False)
    extra: dict[str, int] = field(default_factory=dict, hash=False)


@dataclasses.dataclass(frozen=True)
class PointDC:
    """The same fields as a frozen dataclass: the reference behaviour."""

    x: int
    y: int = 0
    tags: tuple[str, ...] = ()
    note: str = dataclasses.field(default="", compare=False)
    extra: dict[str, int] = dataclasses.field(default_factory=dict, hash=False)


def test_construction_defaults_and_factory() -> None:
    p = Point(1)
    assert (p.x, p.y, p.tags, p.note, p.extra) == (1, 0, (), "", {})
    assert Point(1).extra is not Point(1).extra  # a fresh default per instance
    assert Point(x=2, y=3, note="n").y == 3
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, 2, (), "", {}, 6)  # type: ignore[call-arg]


def test_signature_is_the_real_one() -> None:
    ours = inspect.signature(Point)
    theirs = inspect.signature(PointDC)
    assert list(ours.parameters) == list(theirs.parameters)
    assert [p.default for p in ours.parameters.values()][:4] == [
        inspect.Parameter.empty,
        0,
        (),
        "",
    ]
    assert Point.__init__.__annotations__["x"] == "int"


def test_frozen() -> None:
    p = Point(1)
    with pytest.raises(FrozenInstanceError):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        del p.x
    with pytest.raises(AttributeError):
        p.other = 1  # type: ignore[attr-defined]


@given(
    st.integers(),
    st.integers(),
    st.lists(st.text(max_size=3), max_size=3).map(tuple),
    st.text(max_size=3),
    st.integers(),
    st.integers(),
    st.text(max_size=3),
)
def test_equality_hash_and_repr_agree_with_dataclasses(
    x: int, y: int, tags: tuple[str, ...], note: str, x2: int, y2: int, note2: str
) -> None:
    a, b = Point(x, y, tags, note), Point(x2, y2, tags, note2)
    da, db = PointDC(x, y, tags, note), PointDC(x2, y2, tags, note2)
    assert (a == b) == (da == db)
    assert (a != b) == (da != db)
    assert hash(a) == hash(Point(x, y, tags, note2))  # note is not compared or hashed
    assert repr(a) == repr(da).replace("PointDC", "Point")
    assert a.__eq__((x, y)) is NotImplemented  # a record is not a tuple
    assert replace(a, y=y2) == Point(x, y2, tags, note)


def test_match_args_fields_and_replace() -> None:
    assert Point.__match_args__ == ("x", "y", "tags", "note", "extra")
    assert [f.name for f in fields(Point)] == list(Point.__match_args__)
    match Point(3, 4):
        case Point(x, y):
            assert (x, y) == (3, 4)
    with pytest.raises(TypeError):
        fields(object())


def test_post_init_runs_on_construction_and_replace() -> None:
    @record
    class Positive:
        n: int

        def __post_init__(self) -> None:
            if self.n <= 0:
                raise ValueError("n must be positive")

    assert Positive(1).n == 1
    with pytest.raises(ValueError, match="positive"):
        Positive(0)
    with pytest.raises(ValueError, match="positive"):
        replace(Positive(1), n=-1)


def test_methods_the_class_defines_win() -> None:
    @record
    class Named:
        name: str

        def __repr__(self) -> str:
            return f"<{self.name}>"

    assert repr(Named("a")) == "<a>"


def test_copy_and_pickle() -> None:
    p = Point(1, 2, ("a",), "n", {"k": 1})
    for q in (copy.copy(p), copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert q == p and q.note == "n" and q.extra == {"k": 1}


def test_bad_declarations_are_refused() -> None:
    with pytest.raises(TypeError, match="follows a default"):

        @record
        class Bad:
            a: int = 0
            b: int  # type: ignore[misc]

    with pytest.raises(ValueError, match="both"):
        field(default=1, default_factory=list)  # type: ignore[call-overload]

    with pytest.raises(TypeError, match="inherit"):

        @record
        class Child(Point):
            z: int = 0


def test_importing_it_loads_no_dataclasses() -> None:
    code = (
        "import sys, qcowlib._frozen; print('dataclasses' in sys.modules, 'inspect' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_type_hints_resolve_in_the_module_and_factories_show_as_dataclasses_show_them() -> None:
    from qcowlib.validate import Finding, Policy

    hints = typing.get_type_hints(Finding.__init__)
    assert hints["offset"] == int | None and hints["return"] is type(None)
    assert str(inspect.signature(Policy).parameters["severities"]) == (
        "severities: 'Mapping[str, str]' = <factory>"
    )
    assert str(inspect.signature(Point).parameters["extra"]).endswith("= <factory>")


def test_copy_replace_protocol() -> None:
    assert Point(1).__replace__(y=5) == Point(1, 5)  # type: ignore[attr-defined]  # copy.replace


@pytest.mark.parametrize("name", ["self", "__record_set", "__record_factory"])
def test_names_the_generated_init_uses_are_refused(name: str) -> None:
    with pytest.raises(TypeError, match="bad field name"):
        record(type("Clash", (), {"__annotations__": {name: "int"}}))


def test_mutable_defaults_are_refused() -> None:
    with pytest.raises(ValueError, match="mutable default"):

        @record
        class Shared:
            items: list[int] = []  # noqa: RUF012
