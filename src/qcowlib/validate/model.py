"""The values of the rule engine: findings, reports and rules.

A *rule* is anything with an ``id`` that can be called with a
:class:`~qcowlib.validate.engine.Context` and returns (or yields) :class:`Finding`
values.  Built-in rules and third-party rules (entry point group ``qcowlib.validators``,
or :func:`qcowlib.validate.register`) use this one interface.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, runtime_checkable

from qcowlib._frozen import field, record
from qcowlib._json import JSONObject
from qcowlib.errors import InvalidArgument

if TYPE_CHECKING:
    from qcowlib.validate.engine import Context

__all__ = [
    "SEVERITIES",
    "Finding",
    "Rule",
    "RuleLike",
    "Severity",
    "ValidationReport",
    "rule",
]

Severity = Literal["error", "warning"]
#: ``error`` rejects the image; ``warning`` is reported and does not.
SEVERITIES: Final[tuple[Severity, ...]] = ("error", "warning")
_ALNUM: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_RULE_ID_CHARS: Final = _ALNUM | frozenset("._:-")


def valid_rule_id(rule_id: object) -> bool:
    """1-64 characters of ASCII letters, digits and ``._:-``, starting with a letter or a
    digit (no regular expression: compiling one costs start-up time)."""
    return (
        isinstance(rule_id, str)
        and 0 < len(rule_id) <= 64
        and rule_id[0] in _ALNUM
        and all(c in _RULE_ID_CHARS for c in rule_id)
    )


RuleResult = Iterable["Finding"] | None
CheckFunction = Callable[["Context"], RuleResult]


@record
class Finding:
    """One thing a rule found.

    ``message`` is written for an operator: what is wrong and what to run about it.
    ``offset`` is the file offset at fault when known.  ``structural`` marks a finding
    about an image that does not parse or contradicts itself (the ``permissive`` policy
    keeps only those as errors).
    """

    rule: str
    severity: Severity
    message: str
    offset: int | None = None
    structural: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise InvalidArgument(
                f"finding severity must be 'error' or 'warning', not {self.severity!r}"
            )

    def to_json(self) -> JSONObject:
        """The contract's object: ``rule``, ``severity``, ``message`` and ``offset`` if known."""
        out: dict[str, Any] = {
            "rule": self.rule,
            "severity": self.severity,
            "message": self.message,
        }
        if self.offset is not None:
            out["offset"] = self.offset
        return out


@record
class ValidationReport:
    """The result of :func:`qcowlib.validate.validate`.

    ``format`` is the format detected from the content (as ``qcowlib info`` probes it);
    ``ok`` is true when no finding is an error.
    """

    filename: str
    format: str
    policy: str
    disk_format: str | None
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "error")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "warning")

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        verdict = "accepted" if self.ok else "rejected"
        rules = sorted({f.rule for f in self.errors})
        why = f" [{', '.join(rules)}]" if rules else ""
        return (
            f"<ValidationReport {self.filename!r} {self.format}: {verdict} by policy "
            f"{self.policy}, {len(self.errors)} errors{why}, {len(self.warnings)} warnings>"
        )

    def to_json(self) -> JSONObject:
        """``validate --output json``: ``{"ok", "format", "findings"}``."""
        return {
            "ok": self.ok,
            "format": self.format,
            "findings": [f.to_json() for f in self.findings],
        }

    def human(self) -> str:
        """A short report for a terminal: verdict first, then one finding a line."""
        verdict = "accepted" if self.ok else "rejected"
        declared = f", declared {self.disk_format}" if self.disk_format else ""
        lines = [
            f"{self.filename}: {verdict} by policy {self.policy} (format {self.format}{declared})"
        ]
        for f in self.findings:
            where = f" [offset {f.offset:#x}]" if f.offset is not None else ""
            lines.append(f"  {f.severity:<7} {f.rule}: {f.message}{where}")
        if not self.findings:
            lines.append("  no findings")
        return "\n".join(lines) + "\n"


@runtime_checkable
class RuleLike(Protocol):
    """What the engine accepts as a rule: an ``id`` and a call taking a context."""

    @property
    def id(self) -> str: ...

    def __call__(self, ctx: Context) -> RuleResult: ...


@record
class Rule:
    """A validation rule.

    ``check`` gets a :class:`~qcowlib.validate.engine.Context` bound to this rule and
    returns or yields findings (``ctx.error(...)``, ``ctx.warning(...)``).  ``formats``
    limits the rule to images whose content is (or is forced to be) one of those formats;
    None runs it for every image.  ``severity`` is the most severe finding the rule
    reports under the ``glance`` policy (what ``validate --list-rules`` shows).
    """

    id: str
    check: CheckFunction
    description: str = ""
    formats: frozenset[str] | None = None
    severity: Severity = "error"

    def __post_init__(self) -> None:
        if not valid_rule_id(self.id):
            raise InvalidArgument(
                f"rule id {self.id!r} must be 1-64 characters of letters, digits and ._:-"
            )
        if not callable(self.check):
            raise InvalidArgument(f"rule {self.id!r}: check must be callable")
        if self.severity not in SEVERITIES:
            raise InvalidArgument(
                f"rule {self.id!r}: severity must be 'error' or 'warning', not {self.severity!r}"
            )

    def __call__(self, ctx: Context) -> RuleResult:
        return self.check(ctx)


def rule(
    rule_id: str,
    *,
    description: str | None = None,
    formats: Iterable[str] | None = None,
    severity: Severity = "error",
) -> Callable[[CheckFunction], Rule]:
    """Decorator turning a check function into a :class:`Rule`.

    >>> @rule("site-no-v2", formats=["qcow2"])
    ... def no_v2(ctx):
    ...     if ctx.qcow2_fields().version == 2:
    ...         yield ctx.error("qcow2 v2 (compat 0.10) is not allowed here")
    """

    def wrap(fn: CheckFunction) -> Rule:
        doc = description if description is not None else _first_paragraph(fn.__doc__)
        fmts = frozenset(formats) if formats is not None else None
        return Rule(rule_id, fn, doc, fmts, severity)

    return wrap


def as_rule(obj: object, default_id: str | None = None) -> Rule:
    """Turn a :class:`Rule`, a rule-like object or a plain callable into a :class:`Rule`.

    A plain callable takes its id from ``default_id`` (the entry point's name), else from
    a ``rule_id`` attribute, else from its ``__name__``.
    """
    if isinstance(obj, Rule):
        return obj
    if not callable(obj):
        raise InvalidArgument(f"a rule must be a Rule or a callable, not {type(obj).__name__}")
    rule_id = getattr(obj, "id", None)
    if not isinstance(rule_id, str):
        rule_id = getattr(obj, "rule_id", None)
    if not isinstance(rule_id, str):
        rule_id = default_id or getattr(obj, "__name__", None)
    if not isinstance(rule_id, str):
        raise InvalidArgument("a rule callable needs an id (set rule_id, or use @rule)")
    doc = getattr(obj, "description", None)
    if not isinstance(doc, str):
        doc = _first_paragraph(getattr(obj, "__doc__", None))
    formats = getattr(obj, "formats", None)
    fmts = frozenset(formats) if isinstance(formats, (set, frozenset, tuple, list)) else None
    severity = getattr(obj, "severity", "error")
    return Rule(rule_id, obj, doc, fmts, severity if severity in SEVERITIES else "error")


def _first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph as one line."""
    return " ".join((doc or "").strip().split("\n\n", 1)[0].split())
