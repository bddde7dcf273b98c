"""Running rules over one image: the :class:`Context` rules see, and :func:`validate`.

``validate`` opens the image file itself, read-only, and nothing else: a backing file,
an external data file or a VMDK extent named inside the image is reported, never
opened.  Every read goes through :meth:`Context.read`, which caps its length, so a rule
cannot be made to allocate what a crafted header asks for.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from qcowlib._log import get_logger
from qcowlib.errors import InvalidArgument, QcowlibError, QcowlibIOError
from qcowlib.validate.model import Finding, Rule, ValidationReport, as_rule
from qcowlib.validate.policy import Policy, get_policy

if TYPE_CHECKING:
    from qcowlib.core.hostfile import HostFile
    from qcowlib.formats.detect import Probe
    from qcowlib.formats.qcow2.header import Header
    from qcowlib.validate.formats import InspectorView, Qcow2Fields

__all__ = ["MAX_READ", "MAX_TABLE_READ", "Context", "validate"]

log = get_logger(__name__)

#: The most one :meth:`Context.read` returns: larger than any structure a rule reads
#: (a 2 MiB qcow2 cluster, a 1 MiB VMDK descriptor), small enough to allocate freely.
MAX_READ: Final = 4 * 1024 * 1024
#: The most one :meth:`Context.read_table` returns: the grain tables of a fully
#: allocated 2 TiB VMDK (64 KiB grains); the BAT or block map of a VHD, VHDX or VDI of
#: Glance's 1 TiB cap is far smaller.  Validate refuses what it cannot check.
MAX_TABLE_READ: Final = 128 * 1024 * 1024
#: Findings kept per rule; a rule that finds more is summarised.
MAX_FINDINGS_PER_RULE: Final = 50

T = TypeVar("T")


class _Image:
    """What is shared between the rules that look at one image: the file and caches."""

    def __init__(
        self,
        host: HostFile,
        path: str,
        forced: str | None,
        disk_format: str | None,
        policy: Policy,
    ) -> None:
        from qcowlib.formats import detect
        from qcowlib.validate.formats import INSPECTOR_TO_QEMU, inspector_view

        self.host = host
        self.path = path
        self.size = host.size
        self.head = host.pread(0, min(host.size, detect.PROBE_HEAD_SIZE))
        tail_len = min(host.size, detect.PROBE_TAIL_SIZE)
        self.tail = host.pread(host.size - tail_len, tail_len)
        self.probe: Probe = detect.probe(self.head, self.tail, host.size)
        self.forced = forced
        self.disk_format = disk_format
        self.policy = policy
        self.inspector: InspectorView = inspector_view(self.head, host.size)
        formats = {self.probe.format}
        if forced is not None:
            formats.add(forced)
        formats.update(INSPECTOR_TO_QEMU.get(m, m) for m in self.inspector.matches)
        self.formats = frozenset(formats)
        self.cache: dict[str, tuple[bool, Any]] = {}


class Context:
    """What a rule sees of one image.  Bound to the rule it is handed to.

    Attributes: ``path``; ``size`` (bytes); ``format`` (detected from content, as
    ``qcowlib info`` probes it); ``probe`` (with ``detail``, e.g. ``"footer-only"``);
    ``forced_format`` (``-f``, or None); ``formats`` (every format the content is checked
    as: the detected one, the forced one and those the image inspector sees);
    ``inspector`` (what Glance's image inspector sees); ``disk_format`` (the declared
    one, or None); ``policy``; ``head`` (first 64 KiB) and ``tail`` (last 512 bytes);
    ``rule_id``.
    """

    def __init__(self, image: _Image, rule_id: str) -> None:
        self._image = image
        self.rule_id = rule_id

    # -- the image ----------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._image.path

    @property
    def size(self) -> int:
        return self._image.size

    @property
    def format(self) -> str:
        return self._image.probe.format

    @property
    def probe(self) -> Probe:
        return self._image.probe

    @property
    def forced_format(self) -> str | None:
        return self._image.forced

    @property
    def formats(self) -> frozenset[str]:
        return self._image.formats

    @property
    def inspector(self) -> InspectorView:
        return self._image.inspector

    @property
    def disk_format(self) -> str | None:
        return self._image.disk_format

    @property
    def policy(self) -> Policy:
        return self._image.policy

    @property
    def head(self) -> bytes:
        return self._image.head

    @property
    def tail(self) -> bytes:
        return self._image.tail

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``: fewer where the file ends (none past it).

        ``length`` above :data:`MAX_READ` is a programming error
        (:class:`InvalidArgument`); cap it against your format's limit first.
        """
        return self._read(offset, length, MAX_READ)

    def read_table(self, offset: int, length: int) -> bytes:
        """Like :meth:`read`, for a table whose place the format's codec has checked
        against the file size: up to :data:`MAX_TABLE_READ` bytes.

        ``length`` above it is a programming error (:class:`InvalidArgument`).
        """
        return self._read(offset, length, MAX_TABLE_READ)

    def _read(self, offset: int, length: int, cap: int) -> bytes:
        if length < 0 or offset < 0:
            raise InvalidArgument(f"bad read of {length} bytes at {offset}")
        if length > cap:
            raise InvalidArgument(f"a rule may read at most {cap} bytes at once")
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        return self._image.host.pread(offset, end - offset)

    def same_file_path(self) -> str:
        """A path naming the very file validate opened (``/proc/self/fd/N`` on Linux).

        For rules that hand the image to code taking a path: the file cannot be swapped
        for another one between validate's reads and theirs.
        """
        fd = self._image.host.fd
        proc = f"/proc/self/fd/{fd}"
        if fd >= 0 and os.path.exists(proc):
            return proc
        return self.path

    def cached(self, key: str, compute: Callable[[], T]) -> T:
        """``compute()`` once per image, shared by all rules; an exception is cached too."""
        cache = self._image.cache
        if key not in cache:
            try:
                cache[key] = (True, compute())
            except QcowlibError as exc:
                cache[key] = (False, exc)
        ok, value = cache[key]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    # -- parsed structures, shared -------------------------------------------------------
    def qcow2_fields(self) -> Qcow2Fields:
        """The qcow2 header fields read leniently (works where the full parser refuses).

        Raises :class:`FormatError` when the file is not qcow2 at all.
        """
        from qcowlib.validate.formats import qcow2_fields

        return self.cached("qcow2-fields", lambda: qcow2_fields(self.head))

    def qcow2_header(self) -> Header:
        """The full qcow2 header (:func:`qcowlib.formats.qcow2.header.parse_header`).

        Raises what the parser raises, with this file's name.
        """
        return self.cached("qcow2-header", self._parse_qcow2_header)

    def _parse_qcow2_header(self) -> Header:
        from qcowlib.formats.qcow2 import header as hdr

        head = self.read(0, 4096)
        if len(head) >= 24:
            bits = int.from_bytes(head[20:24], "big")
            if hdr.MIN_CLUSTER_BITS <= bits <= hdr.MAX_CLUSTER_BITS and (1 << bits) > 4096:
                head = self.read(0, 1 << bits)
        try:
            return hdr.parse_header(head, self.size)
        except QcowlibError as exc:
            raise exc.with_file(self.path) from None

    def virtual_size(self) -> int | None:
        """The guest-visible size the image declares, or None when it cannot be read."""
        from qcowlib.validate.structures import declared_virtual_size

        try:
            return self.cached("virtual-size", lambda: declared_virtual_size(self))
        except QcowlibError:
            return None

    # -- findings -----------------------------------------------------------------------
    def error(
        self, message: str, offset: int | None = None, *, structural: bool = False
    ) -> Finding:
        """A finding of this rule that rejects the image (under the ``glance`` policy)."""
        return Finding(self.rule_id, "error", message, offset, structural)

    def warning(
        self, message: str, offset: int | None = None, *, structural: bool = False
    ) -> Finding:
        """A finding of this rule that does not reject the image."""
        return Finding(self.rule_id, "warning", message, offset, structural)


def validate(
    path: str | os.PathLike[str],
    policy: str | Policy = "glance",
    disk_format: str | None = "qcow2",
    *,
    fmt: str | None = None,
    rules: Iterable[object] | None = None,
    extra_rules: Iterable[object] = (),
) -> ValidationReport:
    """Check an image file against a policy before it is uploaded or used.

    ``disk_format`` is the format the image will be declared as (Glance's
    ``disk_format``; ``"vhd"`` and ``"vpc"`` both mean VHD); None checks no declaration.
    ``fmt`` forces the format the file is also parsed as (``-f``); the content is
    always probed too, and the content's rules always run.  ``rules`` replaces the
    rule set (default: built-in, registered and entry-point rules); ``extra_rules`` adds
    to it.

    Findings, not exceptions, report what is wrong *in* the image, however malformed.
    Raises :class:`QcowlibIOError` when the file cannot be opened or read (it is not a
    regular file, does not exist, cannot be read) and :class:`InvalidArgument` for an
    unknown policy or format.  Only the image file itself is opened, read-only.
    """
    from qcowlib.core.hostfile import HostFile

    pol = get_policy(policy)
    disk_format = _check_arguments(fmt, disk_format)
    name = os.fspath(path)
    _require_regular_file(name)
    rule_list, findings = _rules(rules, extra_rules)
    host = HostFile(name)
    try:
        image = _Image(host, name, fmt, disk_format, pol)
        out = _apply(pol, [*findings, *_run_rules(image, rule_list)])
        if not any(f.severity == "error" for f in out) and not any(
            f.rule in NAMES_OTHER_FILES for f in out
        ):
            out += _apply(pol, _readable(Context(image, "readable")))
    finally:
        host.close()
    out.sort(key=lambda f: f.severity != "error")  # errors first, stable otherwise
    return ValidationReport(name, image.probe.format, pol.name, disk_format, tuple(out))


def _check_arguments(fmt: str | None, disk_format: str | None) -> str | None:
    """Refuse an unknown forced format and an empty declared one; the declared format
    stripped."""
    from qcowlib.formats import registry as format_registry

    if fmt is not None and fmt not in format_registry.known():
        known = ", ".join(format_registry.known())
        raise InvalidArgument(f"unknown format {fmt!r} (known: {known})")
    if disk_format is not None:
        disk_format = disk_format.strip()
        if not disk_format:
            raise InvalidArgument("disk_format is empty")
    return disk_format


def _require_regular_file(name: str) -> None:
    """Raises :class:`QcowlibIOError` unless ``name`` is an existing regular file."""
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise QcowlibIOError(f"no such file: {name}", file=name) from None
    except OSError as exc:
        raise QcowlibIOError(f"cannot stat {name}: {exc.strerror}", file=name) from None
    if stat.S_ISDIR(st.st_mode):
        raise QcowlibIOError(f"{name} is a directory", file=name)
    if not stat.S_ISREG(st.st_mode):
        raise QcowlibIOError(f"{name} is not a regular file", file=name)


def _rules(
    rules: Iterable[object] | None, extra_rules: Iterable[object]
) -> tuple[tuple[Rule, ...], list[Finding]]:
    """The rules to run, and a ``hook-load`` finding per entry point that failed to load
    (default rule set only)."""
    from qcowlib.validate import registry

    if rules is not None:
        return tuple(as_rule(r) for r in (*rules, *extra_rules)), []
    rule_list, load_errors = registry.all_rules(extra_rules)
    return rule_list, [
        Finding(
            "hook-load",
            "error",
            f"third-party rule {e.name} ({e.value}) could not be loaded: {e.message}; "
            "fix or uninstall the package that provides it",
            structural=True,
        )
        for e in load_errors
    ]


def _run_rules(image: _Image, rule_list: Iterable[Rule]) -> list[Finding]:
    """The findings of every rule that applies to the image's formats, each id once."""
    findings: list[Finding] = []
    seen_ids: set[str] = set()
    for r in rule_list:
        if r.id in seen_ids:
            continue
        seen_ids.add(r.id)
        if r.formats is not None and not (r.formats & image.formats):
            continue
        findings.extend(_run(r, Context(image, r.id)))
    return findings


#: Rules whose findings mean the image names other files (validate opens none of them,
#: so such an image is not opened through the opener either).
NAMES_OTHER_FILES: Final = frozenset(
    {"backing-file", "data-file", "vmdk-extent", "vmdk-descriptor"}
)


def _apply(pol: Policy, findings: Iterable[Finding]) -> list[Finding]:
    """The findings with the policy's severities, without those it turns off and
    without repeats."""
    out: list[Finding] = []
    seen: set[tuple[str, str, int | None]] = set()
    for f in findings:
        applied = pol.apply(f)
        if applied is None:
            continue
        key = (applied.rule, applied.message, applied.offset)
        if key in seen:
            continue
        seen.add(key)
        out.append(applied)
    return out


def _readable(ctx: Context) -> list[Finding]:
    """An image the rules would accept must also open as ``convert`` opens it (the top
    image alone, the format probed or forced): validate is never laxer than opening.
    What qcowlib cannot read is refused with the reader's reason."""
    from qcowlib.core.chain import BackingPolicy
    from qcowlib.errors import BackingChainError, ImageLocked
    from qcowlib.formats.opener import open_disk

    alone = BackingPolicy(follow=False, follow_data_file=False)
    try:
        open_disk(ctx.same_file_path(), ctx.forced_format, alone).close()
    except (BackingChainError, ImageLocked):
        return []  # about other files or another process, not this image's content
    except QcowlibError as exc:
        return [
            ctx.error(
                f"qcowlib cannot read this image, so convert and flatten would refuse it "
                f"too: {_describe(exc)}",
                exc.offset,
                structural=True,
            )
        ]
    return []


def _run(r: Rule, ctx: Context) -> list[Finding]:
    """Run one rule; whatever it raises becomes a finding, never an exception."""
    found: list[Finding] = []
    extra = 0
    try:
        result = r(ctx)
        for item in result if result is not None else ():
            if not isinstance(item, Finding):
                raise TypeError(f"rule returned {type(item).__name__}, not a Finding")
            if len(found) >= MAX_FINDINGS_PER_RULE:
                extra += 1
                continue
            if not item.rule:
                item = Finding(r.id, item.severity, item.message, item.offset, item.structural)
            found.append(item)
    except QcowlibError as exc:
        found.append(Finding(r.id, "error", _describe(exc), exc.offset, structural=True))
    except Exception as exc:
        log.debug("validation rule %s failed", r.id, exc_info=True)
        found.append(
            Finding(
                r.id,
                "error",
                f"rule {r.id} failed while checking this image ({type(exc).__name__}: {exc}); "
                "the image was not checked by it",
                structural=True,
            )
        )
    if extra:
        found.append(
            Finding(r.id, found[-1].severity, f"... and {extra} more findings of this rule")
        )
    return found


def _describe(exc: QcowlibError) -> str:
    """An error's message with the structure and field at fault, without the file name."""
    where = []
    if exc.structure is not None:
        where.append(exc.structure + (f".{exc.field}" if exc.field else ""))
    text = exc.message
    if where:
        text += f" ({', '.join(where)})"
    return text
