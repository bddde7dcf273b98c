"""Frozen records for the start-up path, without importing :mod:`dataclasses`.

``validate`` of a small image has a start-up budget of 4x ``python -c pass`` (about
37 ms on the reference machine).  Importing :mod:`dataclasses` loads :mod:`inspect`
(with :mod:`ast`, :mod:`dis` and :mod:`tokenize`): ~7 ms there, and each
``@dataclass(frozen=True)`` costs another ~0.3 ms to build.  :func:`record` gives the
same thing a frozen dataclass gives its users (typed fields with defaults, a real
``__init__`` signature for :func:`help` and :func:`inspect.signature`, ``__post_init__``,
value equality and hashing, a readable ``repr``, immutability, ``__match_args__``,
:meth:`replace`-style copies through :func:`replace`) for a tenth of the cost.  Type
checkers treat it as a dataclass (PEP 681 ``dataclass_transform``).

Not supported, on purpose: ``order``, ``slots``, ``kw_only``, ``InitVar`` and
``ClassVar`` fields, inheritance between records.  Records are plain classes: the
:mod:`dataclasses` module functions (``fields``, ``asdict``, ``replace``) do not apply
to them; :func:`fields` and :func:`replace` here do.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform, overload

__all__ = ["FrozenInstanceError", "field", "fields", "record", "replace"]

T = TypeVar("T")

_FIELDS = "__record_fields__"


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class FrozenInstanceError(AttributeError):
    """Assigning to or deleting a field of a frozen record."""


class Field:
    """One field of a record: its name, default and how it takes part in ``==``."""

    __slots__ = ("compare", "default", "default_factory", "hash", "name", "repr")

    def __init__(
        self,
        default: Any,
        default_factory: Callable[[], Any] | Any,
        compare: bool,
        hash: bool | None,
        repr: bool,
    ) -> None:
        self.name = ""
        self.default = default
        self.default_factory = default_factory
        self.compare = compare
        self.hash = compare if hash is None else hash
        self.repr = repr

    def __repr__(self) -> str:
        return f"Field({self.name!r})"


@overload
def field(
    *,
    default: T,
    compare: bool = ...,
    hash: bool | None = ...,
    repr: bool = ...,
) -> T: ...
@overload
def field(
    *,
    default_factory: Callable[[], T],
    compare: bool = ...,
    hash: bool | None = ...,
    repr: bool = ...,
) -> T: ...
def field(
    *,
    default: Any = MISSING,
    default_factory: Any = MISSING,
    compare: bool = True,
    hash: bool | None = None,
    repr: bool = True,
) -> Any:
    """A field with options, as :func:`dataclasses.field` takes them."""
    if default is not MISSING and default_factory is not MISSING:
        raise ValueError("cannot specify both default and default_factory")
    return Field(default, default_factory, compare, hash, repr)


def fields(obj: object) -> tuple[Field, ...]:
    """The fields of a record class or instance, in declaration order."""
    found: tuple[Field, ...] | None = getattr(obj, _FIELDS, None)
    if found is None:
        raise TypeError(f"{obj!r} is not a record")
    return found


def replace(obj: T, /, **changes: Any) -> T:
    """A copy of record ``obj`` with some fields changed (``__post_init__`` runs again)."""
    for f in fields(obj):
        if f.name not in changes:
            changes[f.name] = getattr(obj, f.name)
    return type(obj)(**changes)


def _frozen_setattr(self: object, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: object, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


class _Factory:
    """The default shown for a field with a ``default_factory`` (as dataclasses show it)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY: Any = _Factory()
#: Names the generated ``__init__`` uses itself: no field may take them.
_RESERVED = frozenset({"self", "__record_set", "__record_factory"})


def _make_init(
    cls: type, flds: tuple[Field, ...], annotations: dict[str, Any]
) -> Callable[..., None]:
    """``__init__`` with the fields as parameters, compiled once so that its signature is
    the real one (for ``help()``) and a call costs what a dataclass's costs.  As in
    :mod:`dataclasses`, it is made inside a function run in the class's module globals,
    so that ``typing.get_type_hints`` resolves its annotations there, and the values it
    needs are that function's arguments (closure cells), not globals."""
    values: dict[str, Any] = {"__record_set": object.__setattr__, "__record_factory": _FACTORY}
    params, body = [], []
    for f in flds:
        if f.default_factory is not MISSING:
            values[f"__record_make_{f.name}"] = f.default_factory
            params.append(f"{f.name}=__record_factory")
            body.append(
                f"  __record_set(self, {f.name!r}, __record_make_{f.name}()"
                f" if {f.name} is __record_factory else {f.name})"
            )
            continue
        if f.default is not MISSING:
            values[f"__record_default_{f.name}"] = f.default
            params.append(f"{f.name}=__record_default_{f.name}")
        else:
            params.append(f.name)
        body.append(f"  __record_set(self, {f.name!r}, {f.name})")
    if hasattr(cls, "__post_init__"):
        body.append("  self.__post_init__()")
    source = (
        f"def __record_create({', '.join(values)}):\n"
        f" def __init__(self, {', '.join(params)}):\n" + ("\n".join(body) or "  pass") + "\n"
        " return __init__\n"
    )
    module = sys.modules.get(cls.__module__)
    namespace: dict[str, Any] = {}
    exec(source, vars(module) if module is not None else {}, namespace)
    init: Callable[..., None] = namespace["__record_create"](**values)
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__annotations__ = {f.name: annotations[f.name] for f in flds} | {"return": None}
    return init


def _methods(flds: tuple[Field, ...]) -> dict[str, Any]:
    names = tuple(f.name for f in flds)
    compared = tuple(f.name for f in flds if f.compare)
    hashed = tuple(f.name for f in flds if f.hash)
    shown = tuple(f.name for f in flds if f.repr)

    def __repr__(self: object) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in shown)
        return f"{type(self).__qualname__}({inner})"

    def __eq__(self: object, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        # tuples, as dataclasses compare: an identical value is equal (a NaN to itself)
        mine = tuple(getattr(self, n) for n in compared)
        return mine == tuple(getattr(other, n) for n in compared)

    def __hash__(self: object) -> int:
        return hash(tuple(getattr(self, n) for n in hashed))

    def __replace__(self: Any, /, **changes: Any) -> Any:
        return replace(self, **changes)  # copy.replace() (Python 3.13) calls this

    return {
        "__replace__": __replace__,
        "__repr__": __repr__,
        "__eq__": __eq__,
        "__hash__": __hash__,
        "__setattr__": _frozen_setattr,
        "__delattr__": _frozen_delattr,
        "__match_args__": names,
    }


def _has_default(f: Field) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


@dataclass_transform(frozen_default=True, field_specifiers=(field, Field))
def record(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen record of its annotated fields (see the module docstring)."""
    if any(hasattr(base, _FIELDS) for base in cls.__mro__[1:]):
        raise TypeError(f"{cls.__qualname__}: records do not inherit from records")
    flds: list[Field] = []
    own_annotations = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 - no inspect
    for name, annotation in own_annotations.items():
        if str(annotation).startswith(("ClassVar", "typing.ClassVar")):
            continue
        if not name.isidentifier() or name.startswith("__") or name in _RESERVED:
            raise TypeError(f"{cls.__qualname__}: bad field name {name!r}")
        value = cls.__dict__.get(name, MISSING)
        f = value if isinstance(value, Field) else Field(value, MISSING, True, None, True)
        f.name = name
        if f.default is not MISSING and type(f.default).__hash__ is None:
            raise ValueError(  # as dataclasses: one list shared by every instance is a bug
                f"{cls.__qualname__}.{name}: mutable default {type(f.default).__name__}"
                " is not allowed: use default_factory"
            )
        if flds and not _has_default(f) and _has_default(flds[-1]):
            raise TypeError(f"{cls.__qualname__}: non-default field {name!r} follows a default")
        if isinstance(value, Field):  # the class attribute holds the default, as dataclasses
            if f.default is MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, f.default)
        flds.append(f)
    frozen = tuple(flds)
    setattr(cls, _FIELDS, frozen)
    cls.__init__ = _make_init(cls, frozen, own_annotations)  # type: ignore[method-assign]
    for name, method in _methods(frozen).items():
        own = cls.__dict__.get(name)
        if own is not None and name not in ("__setattr__", "__delattr__"):
            continue  # a method the class defines itself wins, as with dataclasses
        if callable(method):
            method.__qualname__ = f"{cls.__qualname__}.{name}"
        setattr(cls, name, method)
    return cls
