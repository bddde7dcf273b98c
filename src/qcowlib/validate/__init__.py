"""Validation: rules, policies and the hook registry (``qcowlib validate``).

>>> import qcowlib.validate
>>> report = qcowlib.validate("disk.qcow2", policy="glance", disk_format="qcow2")  # doctest: +SKIP
>>> report.ok, [f.message for f in report.findings]                                # doctest: +SKIP

This package is itself callable: ``qcowlib.validate(path, ...)`` is
:func:`~qcowlib.validate.engine.validate`, so the name works both as the function the
top-level package exports and as this package (``qcowlib.validate.register(rule)``).

Third-party rules: a :class:`Rule` (or a plain callable taking a :class:`Context` and
returning findings) registered with :func:`register` or through the
``qcowlib.validators`` entry-point group.  See docs/validation.md.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import inspect

from qcowlib.validate.engine import MAX_READ, Context, validate
from qcowlib.validate.model import SEVERITIES, Finding, Rule, Severity, ValidationReport, rule
from qcowlib.validate.policy import POLICIES, Policy, get_policy, register_policy
from qcowlib.validate.registry import (
    ENTRY_POINT_GROUP,
    RuleInfo,
    all_rules,
    builtin_rules,
    describe_rules,
    register,
    registered_rules,
    reload_entry_points,
    unregister,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "MAX_READ",
    "POLICIES",
    "SEVERITIES",
    "Context",
    "Finding",
    "Policy",
    "Rule",
    "RuleInfo",
    "Severity",
    "ValidationReport",
    "all_rules",
    "builtin_rules",
    "describe_rules",
    "get_policy",
    "register",
    "register_policy",
    "registered_rules",
    "reload_entry_points",
    "rule",
    "unregister",
    "validate",
]


class _CallablePackage(types.ModuleType):
    """``qcowlib.validate(...)`` calls :func:`validate`; attributes work as usual."""

    def __call__(self, *args: Any, **kwargs: Any) -> ValidationReport:
        return validate(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        """:func:`validate`'s, for ``inspect.signature`` and ``help()``."""
        import inspect

        return inspect.signature(validate)


sys.modules[__name__].__class__ = _CallablePackage
