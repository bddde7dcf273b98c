"""The one list of image formats qcowlib knows, and what each can do.

QEMU's ``block/`` keeps one ``BlockDriver`` table per format (probe, open, create,
check); Pillow's plugins register open/save/accept functions.  This module is the same
idea: one :class:`Format` entry per format, with the name qemu-img uses, and the places
that implement reading, writing a new image, creating and checking it.  Command-line
choices, probing, opening a chain, ``convert``/``flatten`` dispatch, ``-o help`` and
validate's detection all come from here; nothing else lists formats.

Implementations are named as ``"module:attribute"`` strings and imported only when
asked for, so that ``qcowlib info`` of a qcow2 image loads neither the VMDK reader nor
any writer (and ``import qcowlib.formats.registry`` costs nothing).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

from qcowlib.errors import InvalidArgument, UnsupportedFeature

if TYPE_CHECKING:
    from qcowlib.core.chain import BackingPolicy
    from qcowlib.core.disk import Disk
    from qcowlib.core.drivers import OutputDriver
    from qcowlib.core.hostfile import HostFile
    from qcowlib.core.probe import Match, ProbeFunction

__all__ = [
    "FORMATS",
    "Format",
    "FormatInfo",
    "Opener",
    "Option",
    "by_name",
    "checkable",
    "creatable",
    "describe",
    "flattenable",
    "glance_disk_format",
    "known",
    "names",
    "option_help",
    "probe_order",
    "readable",
    "upload_targets",
    "writable",
]


class Option(NamedTuple):
    """One ``-o`` creation option, as ``qemu-img create -f FMT -o help`` lists it."""

    name: str
    type: str  # qemu's QemuOpts type names: "str", "bool", "size", "num"
    help: str


class Opener(Protocol):
    """A format's reader: open one layer (no backing files) from an open host file."""

    def __call__(self, host: HostFile, path: str, policy: BackingPolicy) -> Disk: ...


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


class Format(NamedTuple):
    """One format: qemu-img's name and where its parts are implemented.

    ``reader``, ``output``, ``create``, ``resize``, ``writer`` (in place) and ``check``
    are lazy references (``"module:attribute"``), None where qcowlib has no such part.
    ``read_as`` opens the format with another's reader (an ISO 9660 image is a raw
    disk); ``user_format`` False keeps a name the probe reports out of ``-f`` choices.
    ``snapshot``, ``amend`` and ``bitmap`` are the in-place parts behind the commands
    of the same names (internal snapshots, option changes, persistent bitmaps).
    ``nothing_to_check`` is qemu-img's "format does not support checks" (exit 63).
    ``glance`` is Glance's ``disk_format`` for it, and ``upload_options`` the ``-o``
    options ``upload --flatten`` writes it with.
    ``probes`` are the format's probe functions (``formats/<fmt>/probe.py``, see
    :mod:`qcowlib.core.probe`), each with its place in the probing order (lower asked
    first; :mod:`qcowlib.formats.detect` explains the order).
    ``measure`` sizes a new image for ``measure -O`` (a
    :class:`qcowlib.core.measure.SizeMeasure`); ``qemu_create`` says that qemu-img
    can create the format (so that ``measure`` refuses it with qemu-img's words).
    """

    name: str
    title: str
    reader: str | None = None
    output: str | None = None
    stream: bool = False
    create: str | None = None
    resize: str | None = None
    writer: str | None = None
    check: str | None = None
    snapshot: str | None = None
    amend: str | None = None
    bitmap: str | None = None
    nothing_to_check: bool = False
    user_format: bool = True
    read_as: str | None = None
    options: tuple[Option, ...] = ()
    glance: str | None = None
    upload_options: tuple[tuple[str, str], ...] = ()
    probes: tuple[tuple[int, str], ...] = ()
    measure: str | None = None
    qemu_create: bool = False

    @property
    def can_read(self) -> bool:
        return self.reader is not None or self.read_as is not None

    def opener(self) -> Opener:
        """The reader's open function (imports it)."""
        if self.read_as is not None:
            return by_name(self.read_as).opener()
        if self.reader is None:
            raise UnsupportedFeature(f"{self.name} images are not supported yet")
        opener: Opener = _load(self.reader)
        return opener

    def output_driver(self) -> OutputDriver:
        """The writer of new images of this format (imports it)."""
        if self.output is None:
            raise UnsupportedFeature(f"converting to {self.name} is not supported yet")
        driver: OutputDriver = _load(self.output)
        return driver

    def implementation(self, part: str) -> Any:
        """Another named part (``create``, ``check``), imported."""
        ref = getattr(self, part)
        if ref is None:
            raise UnsupportedFeature(f"{part} is not supported for {self.name} images")
        return _load(ref)


_QCOW2_OPTIONS: Final = (
    Option("size", "size", "Virtual disk size"),
    Option("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    Option("backing_file", "str", "File name of a base image"),
    Option("backing_fmt", "str", "Image format of the base image"),
    Option("cluster_size", "size", "qcow2 cluster size"),
    Option(
        "preallocation",
        "str",
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    Option("lazy_refcounts", "bool", "Postpone refcount updates"),
    Option("refcount_bits", "num", "Width of a reference count entry in bits"),
    Option("compression_type", "str", "Compression method used for image cluster compression"),
    Option("extended_l2", "bool", "Extended L2 tables"),
)
_VMDK_OPTIONS: Final = (
    Option("size", "size", "Virtual disk size"),
    Option(
        "adapter_type",
        "str",
        "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
    ),
    Option("compat6", "bool (on/off)", "VMDK version 6 image"),
    Option("hwversion", "str", "VMDK hardware version"),
    Option("toolsversion", "str", "VMware guest tools version"),
    Option(
        "subformat",
        "str",
        "VMDK flat extent format, can be one of {monolithicSparse (default) | "
        "monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized}",
    ),
    Option(
        "zeroed_grain",
        "bool (on/off)",
        "Enable efficient zero writes using the zeroed-grain GTE feature",
    ),
)
_VDI_OPTIONS: Final = (
    Option("size", "size", "Virtual disk size"),
    Option("static", "bool (on/off)", "VDI static (pre-allocated) image"),
)
_VHD_OPTIONS: Final = (
    Option("size", "size", "Virtual disk size"),
    Option(
        "subformat",
        "str",
        "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed}",
    ),
    Option(
        "force_size",
        "bool (on/off)",
        "Force disk size calculation to use the actual size specified, rather than using "
        "the nearest CHS-based calculation",
    ),
)
_VHDX_OPTIONS: Final = (
    Option("size", "size", "Virtual disk size; max of 64TB."),
    Option(
        "subformat",
        "str",
        "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'.",
    ),
    Option(
        "block_size",
        "size",
        "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.",
    ),
    Option("log_size", "size", "Log size; min 1MB."),
    Option(
        "block_state_zero",
        "bool (on/off)",
        "Use payload blocks of type 'ZERO' for absent blocks (create: on by default, as "
        "qemu-img; convert: off, blocks left NOT_PRESENT as Hyper-V writes them)",
    ),
)

#: Every format, in the order help texts list them.
FORMATS: Final[tuple[Format, ...]] = (
    Format(
        "raw",
        "raw disk image",
        measure="qcowlib.formats.raw.measure:MEASURE",
        qemu_create=True,
        probes=((1000, "qcowlib.formats.raw.probe:probe"),),
        reader="qcowlib.formats.raw.reader:open_image",
        output="qcowlib.formats.raw.driver:RAW",
        stream=True,
        create="qcowlib.formats.raw.driver:create",
        resize="qcowlib.formats.raw.driver:resize",
        writer="qcowlib.formats.raw.reader:open_writer",
        nothing_to_check=True,
        options=(
            Option("size", "size", "Virtual disk size"),
            Option(
                "preallocation",
                "str",
                "Preallocation mode (allowed values: off, falloc, full)",
            ),
        ),
        glance="raw",
    ),
    Format(
        "qcow2",
        "QEMU copy-on-write v2/v3",
        measure="qcowlib.formats.qcow2.measure:MEASURE",
        qemu_create=True,
        probes=((10, "qcowlib.formats.qcow2.probe:probe"),),
        reader="qcowlib.formats.qcow2.reader:open_image",
        output="qcowlib.formats.qcow2.driver:QCOW2",
        stream=True,
        create="qcowlib.formats.qcow2.driver:create",
        resize="qcowlib.formats.qcow2.driver:resize",
        writer="qcowlib.formats.opener:open_rw",
        check="qcowlib.formats.qcow2.checkfile:check_file",
        snapshot="qcowlib.formats.qcow2.snapshot_rw:SNAPSHOTS",
        amend="qcowlib.formats.qcow2.amend:AMEND",
        bitmap="qcowlib.formats.qcow2.bitmap_rw:BITMAPS",
        options=_QCOW2_OPTIONS,
        glance="qcow2",
    ),
    Format(
        "vmdk",
        "VMware virtual disk",
        qemu_create=True,
        probes=(
            (40, "qcowlib.formats.vmdk.probe:probe_binary"),
            (130, "qcowlib.formats.vmdk.probe:probe_descriptor"),
        ),
        reader="qcowlib.formats.vmdk.reader:open_image",
        output="qcowlib.formats.vmdk.driver:VMDK",
        create="qcowlib.formats.vmdk.driver:create",
        check="qcowlib.formats.vmdk.check:check_file",
        stream=True,
        options=_VMDK_OPTIONS,
        glance="vmdk",
        upload_options=(("subformat", "streamOptimized"),),
    ),
    Format(
        "vdi",
        "VirtualBox disk image",
        qemu_create=True,
        probes=((60, "qcowlib.formats.vdi.probe:probe"),),
        reader="qcowlib.formats.vdi.reader:open_image",
        output="qcowlib.formats.vdi.driver:VDI",
        create="qcowlib.formats.vdi.driver:create",
        check="qcowlib.formats.vdi.check:check_file",
        stream=True,
        options=_VDI_OPTIONS,
        glance="vdi",
    ),
    Format(
        "vpc",
        "Virtual Hard Disk (VHD)",
        qemu_create=True,
        probes=(
            (70, "qcowlib.formats.vhd.probe:probe_header"),
            (110, "qcowlib.formats.vhd.probe:probe_footer"),
        ),
        reader="qcowlib.formats.vhd.reader:open_image",
        output="qcowlib.formats.vhd.driver:VPC",
        create="qcowlib.formats.vhd.driver:create",
        stream=True,
        nothing_to_check=True,
        options=_VHD_OPTIONS,
        glance="vhd",
    ),
    Format(
        "vhdx",
        "Hyper-V Virtual Hard Disk v2",
        qemu_create=True,
        probes=((50, "qcowlib.formats.vhdx.probe:probe"),),
        reader="qcowlib.formats.vhdx.reader:open_image",
        output="qcowlib.formats.vhdx.driver:VHDX",
        create="qcowlib.formats.vhdx.driver:create",
        stream=True,
        check="qcowlib.formats.vhdx.check:check_file",
        options=_VHDX_OPTIONS,
        glance="vhdx",
    ),
    Format(
        "qcow",
        "QEMU copy-on-write v1 (legacy, read-only)",
        qemu_create=True,
        probes=((11, "qcowlib.formats.qcow.probe:probe"),),
        reader="qcowlib.formats.qcow.reader:open_image",
        nothing_to_check=True,
    ),
    Format(
        "qed",
        "QEMU Enhanced Disk (read-only)",
        qemu_create=True,
        probes=((20, "qcowlib.formats.qed.probe:probe"),),
        reader="qcowlib.formats.qed.reader:open_image",
        check="qcowlib.formats.qed.check:check_file",
    ),
    Format(
        "parallels",
        "Parallels disk image (read-only)",
        qemu_create=True,
        probes=((30, "qcowlib.formats.parallels.probe:probe"),),
        reader="qcowlib.formats.parallels.reader:open_image",
        check="qcowlib.formats.parallels.check:check_file",
        glance="ploop",
    ),
    Format(
        "bochs",
        "Bochs growing redolog image",
        probes=((80, "qcowlib.formats.bochs.probe:probe"),),
        reader="qcowlib.formats.bochs.reader:open_image",
        nothing_to_check=True,
    ),
    Format(
        "cloop",
        "cloop V2.0 compressed loop image",
        probes=((90, "qcowlib.formats.cloop.probe:probe"),),
        reader="qcowlib.formats.cloop.reader:open_image",
        nothing_to_check=True,
    ),
    Format(
        "dmg",
        "Apple disk image (UDIF)",
        probes=((100, "qcowlib.formats.dmg.probe:probe"),),
        reader="qcowlib.formats.dmg.reader:open_image",
        nothing_to_check=True,
    ),
    Format(
        "luks",
        "LUKS encrypted volume",
        qemu_create=True,
        probes=((120, "qcowlib.formats.luks.probe:probe"),),
        reader="qcowlib.formats.luks.reader:open_image",
        nothing_to_check=True,
    ),
    Format(
        "iso",
        "ISO 9660 image (a raw disk)",
        probes=((140, "qcowlib.formats.iso.probe:probe"),),
        user_format=False,
        read_as="raw",
        nothing_to_check=True,
    ),
)

_BY_NAME: Final[dict[str, Format]] = {f.name: f for f in FORMATS}


def known() -> tuple[str, ...]:
    """Every format name the probe can report (including ``iso``)."""
    return tuple(_BY_NAME)


def names() -> tuple[str, ...]:
    """The format names a user can give with ``-f``/``-F``/``-O``."""
    return tuple(f.name for f in FORMATS if f.user_format)


def readable() -> tuple[str, ...]:
    """Format names qcowlib opens (``-f`` choices)."""
    return tuple(f.name for f in FORMATS if f.user_format and f.can_read)


def writable() -> tuple[str, ...]:
    """Format names ``convert -O`` writes."""
    return tuple(f.name for f in FORMATS if f.output is not None)


def flattenable() -> tuple[str, ...]:
    """Format names ``flatten -O`` writes (those with an in-order stream)."""
    return tuple(f.name for f in FORMATS if f.output is not None and f.stream)


def creatable() -> tuple[str, ...]:
    """Format names ``create -f`` makes."""
    return tuple(f.name for f in FORMATS if f.create is not None)


def checkable() -> tuple[str, ...]:
    """Format names ``check`` examines."""
    return tuple(f.name for f in FORMATS if f.check is not None)


def glance_disk_format(name: str) -> str:
    """Glance's ``disk_format`` for format ``name`` (its own name where Glance has none)."""
    entry = _BY_NAME.get(name)
    return entry.glance if entry is not None and entry.glance else name


def upload_targets() -> dict[str, dict[str, str]]:
    """What ``upload --flatten`` can send: Glance disk_format -> the output's options."""
    return {
        f.glance or f.name: dict(f.upload_options)
        for f in FORMATS
        if f.output is not None and f.stream
    }


class _LazyProbe:
    """A probe function imported when first asked: the first probe that answers ends a
    probe, so ``info`` of a qcow2 image loads neither the DMG nor the Bochs codec."""

    __slots__ = ("_function", "ref")

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self._function: ProbeFunction | None = None

    def __call__(self, head: bytes, tail: bytes, file_size: int) -> Match | None:
        if self._function is None:
            self._function = _load(self.ref)
        return self._function(head, tail, file_size)

    def __repr__(self) -> str:
        return f"<probe {self.ref}>"


@functools.cache
def probe_order() -> tuple[tuple[str, ProbeFunction], ...]:
    """Every format's probes as (format name, probe function), in the order to ask them
    (each probe module is imported when its probe is first asked).  The last one, raw's,
    answers for anything."""
    ranked = sorted((rank, f.name, ref) for f in FORMATS for rank, ref in f.probes)
    return tuple((name, _LazyProbe(ref)) for _, name, ref in ranked)


def by_name(name: str) -> Format:
    """The entry for ``name``; :class:`InvalidArgument` for a name no format has."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise InvalidArgument(
            f"Unknown file format '{name}' (known: {', '.join(names())})"
        ) from None


def option_help(name: str) -> str:
    """``-o help`` for format ``name``: its creation options, one a line, as qemu-img."""
    fmt = by_name(name)
    lines = [f"Supported options for {fmt.name}:"]
    shown = [f"{o.name}=<{o.type}>" for o in fmt.options]
    width = max(map(len, shown), default=0) + 2
    lines += [f"  {s:<{width}}- {o.help}" for s, o in zip(shown, fmt.options, strict=True)]
    if not fmt.options:
        lines.append("  (none)")
    return "\n".join(lines) + "\n"


class FormatInfo(NamedTuple):
    """What ``qcowlib.formats()`` says of one format."""

    name: str
    title: str
    read: bool
    write: bool
    stream: bool
    create: bool
    check: bool


def describe(entries: Sequence[Format] = FORMATS) -> list[FormatInfo]:
    """The registry as plain records (``qcowlib.formats()``), formats users can name."""
    return [
        FormatInfo(
            name=f.name,
            title=f.title,
            read=f.can_read,
            write=f.output is not None,
            stream=f.output is not None and f.stream,
            create=f.create is not None,
            check=f.check is not None,
        )
        for f in entries
        if f.user_format
    ]
