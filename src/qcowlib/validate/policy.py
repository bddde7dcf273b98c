"""Validation policies: which findings reject an image, and the limits rules apply.

Three built-in policies:

``glance``
    What Glance 33 refuses on upload (``container_format=bare``): the checks of
    ``oslo_utils.imageutils.format_inspector`` and Glance's ``[image_format]`` options
    with their defaults, plus images that do not parse at all.  Rules emit their
    findings with the severities of this policy.
``strict``
    Every finding is an error.
``permissive``
    Only structural findings (an image that does not parse or contradicts itself) keep
    their severity; everything else becomes a warning.

Settings are Glance's option names and defaults.  Make a variant with
:meth:`Policy.replace` (``get_policy("glance").replace(image_size_cap=10 * 2**30)``)
and pass it to ``validate``, or register it under a new name with
:func:`register_policy`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

from qcowlib import _frozen
from qcowlib._frozen import field, record
from qcowlib.errors import InvalidArgument
from qcowlib.validate.model import SEVERITIES, Finding

__all__ = [
    "GLANCE_DISK_FORMATS",
    "IMAGE_SIZE_CAP",
    "POLICIES",
    "Policy",
    "get_policy",
    "register_policy",
]

Mode = Literal["glance", "strict", "permissive"]
MODES: Final[tuple[Mode, ...]] = ("glance", "strict", "permissive")
#: Glance's ``image_size_cap`` default: 1 TiB.
IMAGE_SIZE_CAP: Final = 1 << 40
#: Glance's ``[image_format] disk_formats`` default.
GLANCE_DISK_FORMATS: Final = (
    "ami",
    "ari",
    "aki",
    "vhd",
    "vhdx",
    "vmdk",
    "raw",
    "qcow2",
    "vdi",
    "iso",
    "ploop",
)
#: qcow2 incompatible feature bits the image inspector lets through: dirty, corrupt,
#: external data file and compression type (the data file bit has its own check).
GLANCE_QCOW2_INCOMPATIBLE_MASK: Final = 0b1111


@record
class Policy:
    """A named policy: a severity mode, Glance's settings, and per-rule overrides.

    ``severities`` maps a rule id to ``"error"``, ``"warning"`` or ``"off"`` and is
    applied last, after the mode.
    """

    name: str
    mode: Mode = "glance"
    #: Glance ``image_size_cap``: the largest file Glance accepts (413 above it).
    image_size_cap: int = IMAGE_SIZE_CAP
    #: Largest virtual size accepted; None means ``image_size_cap``.
    max_virtual_size: int | None = None
    #: Glance ``[image_format] vmdk_allowed_types``.
    vmdk_allowed_types: tuple[str, ...] = ("streamOptimized", "monolithicSparse")
    #: Glance ``[image_format] require_image_format_match``.
    require_image_format_match: bool = True
    #: Glance ``[image_format] gpt_safety_checks_nonfatal`` (e.g. ``("mbr",)``).
    gpt_safety_checks_nonfatal: tuple[str, ...] = ()
    #: Glance ``[image_format] disk_formats``: the disk_format values it takes at all.
    disk_formats: tuple[str, ...] = GLANCE_DISK_FORMATS
    #: qcow2 incompatible feature bits accepted (beyond them: ``unknown-features``).
    qcow2_incompatible_mask: int = GLANCE_QCOW2_INCOMPATIBLE_MASK
    #: Run ``qcowlib check`` on qcow2 images (when qcowlib.ops.check is available).
    run_check: bool = True
    severities: Mapping[str, str] = field(default_factory=dict, hash=False)
    description: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgument(f"policy mode must be one of {', '.join(MODES)}")
        for rule_id, sev in self.severities.items():
            if sev not in (*SEVERITIES, "off"):
                raise InvalidArgument(
                    f"policy {self.name!r}: severity for {rule_id!r} must be error, "
                    f"warning or off, not {sev!r}"
                )
        if self.image_size_cap <= 0:
            raise InvalidArgument("image_size_cap must be positive")

    @property
    def virtual_size_limit(self) -> int:
        return self.image_size_cap if self.max_virtual_size is None else self.max_virtual_size

    def replace(self, **changes: Any) -> Policy:
        """A copy with some settings changed."""
        return _frozen.replace(self, **changes)

    def apply(self, finding: Finding) -> Finding | None:
        """The finding with this policy's severity (None when the rule is turned off)."""
        severity = finding.severity
        if self.mode == "strict":
            severity = "error"
        elif self.mode == "permissive" and not finding.structural:
            severity = "warning"
        override = self.severities.get(finding.rule)
        if override == "off":
            return None
        if override in SEVERITIES:
            severity = override
        if severity == finding.severity:
            return finding
        return _frozen.replace(finding, severity=severity)


POLICIES: dict[str, Policy] = {
    "glance": Policy(
        "glance",
        "glance",
        description="refuse what Glance 33 refuses on upload, and images that do not parse",
    ),
    "strict": Policy("strict", "strict", description="every finding is an error"),
    "permissive": Policy(
        "permissive", "permissive", description="only images that do not parse are refused"
    ),
}


def get_policy(policy: str | Policy) -> Policy:
    """A policy by name (or the policy itself).  Raises :class:`InvalidArgument`."""
    if isinstance(policy, Policy):
        return policy
    try:
        return POLICIES[policy]
    except (KeyError, TypeError):
        names = ", ".join(sorted(POLICIES))
        raise InvalidArgument(f"unknown policy {policy!r} (known: {names})") from None


def register_policy(policy: Policy, *, replace: bool = False) -> None:
    """Make ``policy`` available by its name (``--policy NAME``)."""
    if policy.name in POLICIES and not replace:
        raise InvalidArgument(f"policy {policy.name!r} is already registered")
    POLICIES[policy.name] = policy
