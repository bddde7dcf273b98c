"""The ``qcowlib`` command line: argparse front end with qemu-img's option spellings.

Exit status follows the contract: 0 success, 1 error (one ``qcowlib: error: ...`` line on
stderr, never a traceback), 2 usage error; ``compare`` returns 0 identical, 1 different,
2 error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn

from qcowlib._log import configure_on_use, get_logger
from qcowlib._units import split_qemu_opts
from qcowlib.errors import QcowlibError
from qcowlib.formats import registry

log = get_logger("qcowlib")

#: ``-f``/``-F``/``-O`` choices: the formats qcowlib reads (from the registry).
INPUT_FORMATS = registry.readable()


class _Parser(argparse.ArgumentParser):
    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse asks shutil for the width, and shutil imports bz2 and lzma (~2 ms on
        # every run: add_argument formats metavars); the same answer without them.
        return self.formatter_class(prog=self.prog, width=_terminal_width())  # type: ignore[call-arg]

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"qcowlib: error: {message}\n")


def _terminal_width() -> int:
    """``shutil.get_terminal_size().columns - 2``, as argparse computes its width."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 80
    return (columns or 80) - 2


class Failed(Exception):
    """A command failed with a message already formatted, and an exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


#: ``--backing-policy`` choices (qcowlib.core.chain.POLICY_NAMES).
BACKING_POLICIES = ("follow", "contained", "none")


def add_read_options(p: argparse.ArgumentParser, *, share: bool = True) -> None:
    """``--backing-policy`` and (with ``share``) ``-U/--force-share``, for every command
    that reads an image."""
    p.add_argument(
        "--backing-policy",
        dest="backing_policy",
        choices=BACKING_POLICIES,
        default="follow",
        help="which backing, data and extent files an image may name: follow (default, "
        "as qemu-img), contained (only relative names inside the top image's directory "
        "after resolving symlinks, with a recorded format) or none (the top image alone; "
        "unallocated ranges read as zeros)",
    )
    if share:
        p.add_argument(
            "-U",
            "--force-share",
            dest="force_share",
            action="store_true",
            help="read images that another process (a running VM) has open for writing, "
            "as qemu-img -U; what is read may be inconsistent",
        )


def add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", choices=("human", "json"), default="human", help="output format")


def print_json(value: Any) -> None:
    import json

    sys.stdout.write(json.dumps(value, indent=4) + "\n")


# -- commands ------------------------------------------------------------------------------


def _cmd_info(args: argparse.Namespace) -> int:
    from qcowlib.cli.render import human_info
    from qcowlib.ops.info import info

    result = info(
        args.filename,
        args.format,
        backing_chain=args.backing_chain,
        backing_policy=args.backing_policy,
        force_share=args.force_share,
    )
    if args.output == "json":
        print_json(result)
    elif isinstance(result, list):
        sys.stdout.write("\n".join(human_info(r) for r in result))
    else:
        sys.stdout.write(human_info(result))
    return 0


def _cmd_map(args: argparse.Namespace) -> int:
    from qcowlib.cli.render import human_map, render_map_json
    from qcowlib.formats.opener import open_disk
    from qcowlib.ops.map import map_entries

    with open_disk(
        args.filename, args.format, args.backing_policy, force_share=args.force_share
    ) as disk:
        entries = list(map_entries(disk))
    if args.output == "json":
        sys.stdout.write(render_map_json(entries))
        return 0
    text, error = human_map(entries)
    sys.stdout.write(text)
    if error:
        raise Failed(error)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from qcowlib.formats.opener import open_disk
    from qcowlib.ops.compare import compare

    policy, share = args.backing_policy, args.force_share
    try:
        with (
            open_disk(args.filename1, args.format1, policy, force_share=share) as a,
            open_disk(args.filename2, args.format2, policy, force_share=share) as b,
        ):
            result = compare(a, b, strict=args.strict)
    except QcowlibError as exc:
        raise Failed(str(exc), 2) from None
    for line in result.messages:
        sys.stdout.write(line + "\n")
    return 0 if result.identical else 1


def parse_options(text: str | None) -> dict[str, str]:
    """qemu-img's ``-o key=value,key=value`` (a bare key means ``on``; ``,,`` is a comma)."""
    options: dict[str, str] = {}
    if not text:
        return options
    for item in split_qemu_opts(text):
        if not item:
            continue
        key, sep, value = item.partition("=")
        options[key.strip()] = value if sep else "on"
    return options


def wants_option_help(options: dict[str, str], fmt: str) -> bool:
    """``-o help``: print the format's creation options (from the registry) and say so."""
    if options.get("help") != "on" and options.get("?") != "on":
        return False
    from qcowlib.formats.registry import option_help

    sys.stdout.write(option_help(fmt))
    return True


def _cmd_convert(args: argparse.Namespace) -> int:
    from qcowlib._units import parse_size
    from qcowlib.cli.progress import ProgressBar
    from qcowlib.ops.convert import convert

    options = parse_options(args.options)
    if wants_option_help(options, args.out_format):
        return 0
    sparse = parse_size(args.sparse_size) if args.sparse_size is not None else 4096
    bar = ProgressBar() if args.progress else None
    try:
        convert(
            args.src,
            args.dst,
            args.out_format,
            src_format=args.format,
            compress=args.compress,
            options=options,
            backing=args.backing,
            backing_format=args.backing_format,
            sparse_size=sparse,
            progress=bar.update if bar else None,
            backing_policy=args.backing_policy,
            force_share=args.force_share,
        )
    finally:
        if bar:
            bar.finish()
    return 0


# -- parser -------------------------------------------------------------------------------


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser (exposed for the CLI reference and tests).

    With ``only`` (a command name), just that command's parser is built: a run of one
    command does not pay for building (and importing) every other command's options.
    """
    parser = _Parser(prog="qcowlib", description="Inspect and convert virtual disk images.")
    parser.add_argument("--version", action=_VersionAction, nargs=0)
    parser.add_argument("--debug", action="store_true", help="log debugging detail to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    wanted = [only] if only in COMMANDS else list(COMMANDS)
    import importlib

    registered: set[str] = set()
    for name in wanted:
        module = COMMANDS[name]
        if module is None:
            _register_core(sub, name)
        elif module not in registered:
            importlib.import_module(f"qcowlib.cli.{module}").register(sub)
            registered.add(module)
    return parser


def _register_core(sub: argparse._SubParsersAction[_Parser], name: str) -> None:
    """The commands this module implements itself."""
    if name == "info":
        p = sub.add_parser("info", help="show image information")
        p.add_argument("-f", dest="format", choices=INPUT_FORMATS)
        add_output(p)
        p.add_argument("--backing-chain", action="store_true")
        add_read_options(p)
        p.add_argument("filename")
        p.set_defaults(func=_cmd_info)
    elif name == "map":
        p = sub.add_parser("map", help="show the allocation map")
        p.add_argument("-f", dest="format", choices=INPUT_FORMATS)
        add_output(p)
        add_read_options(p)
        p.add_argument("filename")
        p.set_defaults(func=_cmd_map)
    elif name == "compare":
        p = sub.add_parser("compare", help="compare guest content of two images")
        p.add_argument("-f", dest="format1", choices=INPUT_FORMATS)
        p.add_argument("-F", dest="format2", choices=INPUT_FORMATS)
        p.add_argument("-s", dest="strict", action="store_true", help="strict mode")
        add_read_options(p)
        p.add_argument("filename1")
        p.add_argument("filename2")
        p.set_defaults(func=_cmd_compare)
    elif name == "convert":
        p = sub.add_parser("convert", help="convert an image to another format")
        p.add_argument("-f", dest="format", choices=INPUT_FORMATS)
        p.add_argument("-O", dest="out_format", default="raw", choices=INPUT_FORMATS)
        p.add_argument("-o", dest="options")
        p.add_argument("-c", dest="compress", action="store_true")
        p.add_argument("-B", dest="backing")
        p.add_argument("-F", dest="backing_format")
        p.add_argument("-S", dest="sparse_size")
        p.add_argument("-p", dest="progress", action="store_true")
        add_read_options(p)
        p.add_argument("src")
        p.add_argument("dst")
        p.set_defaults(func=_cmd_convert)


#: Every command, in help order, and the module under qcowlib.cli that registers it
#: through ``register(sub)`` (None: this module).
COMMANDS: dict[str, str | None] = {
    "info": None,
    "map": None,
    "compare": None,
    "convert": None,
    "create": "cmd_create",
    "measure": "cmd_measure",
    "resize": "cmd_modify",
    "rebase": "cmd_modify",
    "commit": "cmd_modify",
    "flatten": "cmd_flatten",
    "check": "cmd_check",
    "checksum": "cmd_checksum",
    "validate": "cmd_validate",
    "upload": "cmd_upload",
}


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked (importlib.metadata costs ~40 ms)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        sys.stdout.write(_version() + "\n")
        parser.exit(0)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"qcowlib {version('qcowlib')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "qcowlib (unknown version)"


#: Attributes that hold image names, which ``--image-opts`` turns into option strings.
_IMAGE_ARGS: Final = ("filename", "src", "filename1", "filename2")


def _take_secret_options(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """Remove ``--object SPEC`` and ``--image-opts`` (valid for every command, anywhere
    on the line, as in qemu-img) from ``argv``; return the rest, the specs, the flag."""
    rest: list[str] = []
    objects: list[str] = []
    image_opts = False
    it = iter(argv)
    for arg in it:
        if arg == "--":
            rest.append(arg)
            rest.extend(it)
            break
        if arg == "--object":
            spec = next(it, None)
            if spec is None:
                rest.append(arg)  # argparse reports the missing value
                break
            objects.append(spec)
        elif arg.startswith("--object="):
            objects.append(arg.partition("=")[2])
        elif arg == "--image-opts":
            image_opts = True
        else:
            rest.append(arg)
    return rest, objects, image_opts


def _image_keys(
    args: argparse.Namespace, objects: list[str], image_opts: bool
) -> contextlib.AbstractContextManager[None]:
    """Passphrases for the images named with ``--image-opts`` (``key-secret=ID`` naming
    an ``--object secret``); rewrites those arguments to plain file names."""
    from qcowlib.core.secrets import image_keys, parse_image_opts, parse_secret_object

    secrets = dict(parse_secret_object(spec) for spec in objects)
    keys: dict[str | os.PathLike[str], bytes | str] = {}
    for attr in _IMAGE_ARGS if image_opts else ():
        text = getattr(args, attr, None)
        if text is None:
            continue
        path, fmt, secret = parse_image_opts(text)
        setattr(args, attr, path)
        fmt_attr = {"filename2": "format2", "filename1": "format1"}.get(attr, "format")
        if fmt is not None and getattr(args, fmt_attr, None) is None:
            setattr(args, fmt_attr, fmt)
        if secret is not None:
            if secret not in secrets:
                raise Failed(f"No secret with id '{secret}' found")
            keys[path] = secrets[secret]
    return image_keys(keys)


def _configure_logging(debug: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="qcowlib: %(levelname)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Run as the program (``argv`` None), SIGINT, SIGTERM and SIGHUP unwind and clean up
    (:mod:`qcowlib.core.interrupt`; ``qcowlib.__main__.run`` installs the same earlier,
    this covers console scripts made before it was their entry point).
    """
    if argv is None:
        from qcowlib.core import interrupt

        interrupt.install()
    # qcowlib never multiplies matrices: keep numpy's BLAS from starting (and spinning)
    # a thread per core in this process, which costs ~0.1 s of CPU per run.
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    argv, objects, image_opts = _take_secret_options(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    if "resize" in argv and argv and re.match(r"^-\d", argv[-1]) and "--" not in argv:
        argv.insert(len(argv) - 1, "--")  # "resize FILE -3M": a size, not an option
    args = parser.parse_args(argv)
    configure_on_use(lambda: _configure_logging(args.debug))
    func: Callable[[argparse.Namespace], int] = args.func
    error_status = 2 if args.command == "compare" else 1
    try:
        with _image_keys(args, objects, image_opts):
            return func(args)
    except Failed as exc:
        sys.stderr.write(f"qcowlib: error: {exc}\n")
        return exc.status
    except QcowlibError as exc:
        sys.stderr.write(f"qcowlib: error: {exc}\n")
        return error_status
    except KeyboardInterrupt as exc:
        from qcowlib.core import interrupt

        return interrupt.report(exc)
    except BrokenPipeError:
        return error_status
    except OSError as exc:
        sys.stderr.write(f"qcowlib: error: {exc}\n")
        return error_status
    except Exception as exc:  # a bug: never show users a traceback, keep it in the log
        log.debug("internal error", exc_info=True)
        sys.stderr.write(f"qcowlib: error: internal error: {type(exc).__name__}: {exc}\n")
        return error_status
