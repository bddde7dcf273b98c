"""The rule registry: built-in rules, rules registered from Python, and entry points.

Third-party packages add rules through the ``qcowlib.validators`` entry-point group::

    [project.entry-points."qcowlib.validators"]
    site-max-size = "mysite.rules:max_size"       # a Rule, or a plain callable

A plain callable gets the entry point's name as its rule id.  The group is listed by
:mod:`qcowlib.validate.entrypoints` (``importlib.metadata``'s answer, mostly without
importing it).  Entry points are loaded once, on the first validation, and a rule that
cannot be loaded is reported as a ``hook-load`` error in every report (a check that was
meant to run must not be skipped silently).
"""

from __future__ import annotations

import _thread
from collections.abc import Iterable
from typing import Final

from qcowlib._frozen import record
from qcowlib._log import get_logger
from qcowlib.errors import InvalidArgument
from qcowlib.validate.model import Rule, Severity, as_rule

__all__ = [
    "ENTRY_POINT_GROUP",
    "LoadError",
    "RuleInfo",
    "all_rules",
    "builtin_rules",
    "describe_rules",
    "entry_point_rules",
    "register",
    "registered_rules",
    "reload_entry_points",
    "unregister",
]

log = get_logger(__name__)

ENTRY_POINT_GROUP: Final = "qcowlib.validators"

#: Re-entrant: an entry point module may call register() while it is being loaded.
_lock = _thread.RLock()  # threading's own, without importing threading
_registered: dict[str, Rule] = {}
#: The loaded entry points (one slot; None until first needed).
_entry_points: list[tuple[tuple[Rule, ...], tuple[LoadError, ...]] | None] = [None]


@record
class LoadError:
    """An entry point that could not be turned into a rule."""

    name: str
    value: str
    message: str


def builtin_rules() -> tuple[Rule, ...]:
    """qcowlib's own rules, in the order they run."""
    from qcowlib.validate.rules import BUILTIN_RULES

    return BUILTIN_RULES


def register(rule: object, *, replace: bool = False) -> Rule:
    """Add a rule for every later validation in this process; returns it as a Rule.

    ``rule`` is a :class:`Rule`, an object with ``id`` and ``__call__``, or a plain
    callable (its id is its ``rule_id`` attribute or ``__name__``).  Raises
    :class:`InvalidArgument` when the id is taken (by a built-in rule, or by another
    registered rule unless ``replace``).
    """
    r = as_rule(rule)
    if any(b.id == r.id for b in builtin_rules()):
        raise InvalidArgument(f"rule id {r.id!r} belongs to a built-in rule")
    with _lock:
        if r.id in _registered and not replace:
            raise InvalidArgument(f"rule {r.id!r} is already registered")
        _registered[r.id] = r
    return r


def unregister(rule: object) -> None:
    """Remove a rule added with :func:`register` (by the rule or its id)."""
    rule_id = rule if isinstance(rule, str) else getattr(rule, "id", None)
    with _lock:
        if not isinstance(rule_id, str) or _registered.pop(rule_id, None) is None:
            raise InvalidArgument(f"no registered rule {rule_id!r}")


def registered_rules() -> tuple[Rule, ...]:
    with _lock:
        return tuple(_registered.values())


def reload_entry_points() -> None:
    """Forget the loaded entry points; the next validation looks them up again."""
    with _lock:
        _entry_points[0] = None


def entry_point_rules() -> tuple[tuple[Rule, ...], tuple[LoadError, ...]]:
    """The rules of the ``qcowlib.validators`` group, and the entry points that failed."""
    with _lock:
        loaded = _entry_points[0]
        if loaded is None:
            loaded = _entry_points[0] = _load_entry_points()
        return loaded


def _load_entry_points() -> tuple[tuple[Rule, ...], tuple[LoadError, ...]]:
    from qcowlib.validate import entrypoints

    taken = {r.id for r in builtin_rules()}
    rules: list[Rule] = []
    errors: list[LoadError] = []
    seen: set[tuple[str, str]] = set()
    try:
        eps = entrypoints.group_entries(ENTRY_POINT_GROUP)
    except Exception as exc:  # broken metadata on sys.path must not stop validation
        return (), (LoadError("*", ENTRY_POINT_GROUP, f"cannot list entry points: {exc}"),)
    for name, value in eps:
        if (name, value) in seen:
            continue  # the same distribution found twice on sys.path
        seen.add((name, value))
        try:
            loaded = entrypoints.load(value)
            found = _rules_from(loaded, name)
        except Exception as exc:
            log.debug("cannot load validator %s = %s", name, value, exc_info=True)
            errors.append(LoadError(name, value, f"{type(exc).__name__}: {exc}"))
            continue
        for r in found:
            if r.id in taken:
                errors.append(LoadError(name, value, f"rule id {r.id!r} is already taken"))
                continue
            taken.add(r.id)
            rules.append(r)
    return tuple(rules), tuple(errors)


def _rules_from(loaded: object, name: str) -> list[Rule]:
    if isinstance(loaded, (list, tuple)):
        return [as_rule(item) for item in loaded]
    return [as_rule(loaded, name)]


def all_rules(extra: Iterable[object] = ()) -> tuple[tuple[Rule, ...], tuple[LoadError, ...]]:
    """Built-in, registered, entry-point and ``extra`` rules, and entry-point failures."""
    ep_rules, errors = entry_point_rules()
    rules = [*builtin_rules(), *registered_rules(), *ep_rules]
    ids = {r.id for r in rules}
    for obj in extra:
        r = as_rule(obj)
        if r.id in ids:
            raise InvalidArgument(f"rule id {r.id!r} is already taken")
        ids.add(r.id)
        rules.append(r)
    return tuple(rules), errors


@record
class RuleInfo:
    """What ``validate --list-rules`` shows of one rule."""

    #: The rule id, as findings and policies name it.
    name: str
    #: The most severe finding it reports under the glance policy (``strict`` makes every
    #: finding an error; ``permissive`` keeps only findings about unparsable images).
    severity: Severity
    #: What the rule checks.
    description: str
    #: The formats it applies to (None: every image).
    formats: tuple[str, ...] | None
    #: ``builtin``, ``registered`` (from Python) or ``entry-point``.
    source: str

    def to_json(self) -> dict[str, str | list[str] | None]:
        """The ``validate --list-rules --output json`` object."""
        return {
            "rule": self.name,
            "severity": self.severity,
            "formats": list(self.formats) if self.formats is not None else None,
            "source": self.source,
            "description": self.description,
        }


def describe_rules() -> list[RuleInfo]:
    """Every rule a validation runs (built-in, registered, from entry points), in order."""
    ep_rules, _ = entry_point_rules()
    groups = (
        ("builtin", builtin_rules()),
        ("registered", registered_rules()),
        ("entry-point", ep_rules),
    )
    return [
        RuleInfo(
            r.id,
            r.severity,
            r.description,
            tuple(sorted(r.formats)) if r.formats is not None else None,
            source,
        )
        for source, rules in groups
        for r in rules
    ]
