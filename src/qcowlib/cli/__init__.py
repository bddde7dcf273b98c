"""The ``qcowlib`` command line: argparse front end with qemu-img's option spellings.

Exit status follows the contract: 0 success, 1 error (one ``qcowlib: error: ...`` line on
stderr, never a traceback), 2 usage error; ``compare`` returns 0 identical, 1 different,
2 error.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn

from qcowlib._log import configure_on_use, get_logger
from qcowlib._units import split_qemu_opts
from qcowlib.cli.helptext import DOCS, HelpFormatter, did_you_mean
from qcowlib.errors import QcowlibError
from qcowlib.formats import registry

log = get_logger("qcowlib")

#: ``-f``/``-F``/``-O`` choices: the formats qcowlib reads (from the registry).
INPUT_FORMATS = registry.readable()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse asks shutil for the width, and shutil imports bz2 and lzma (~2 ms on
        # every run: add_argument formats metavars); the same answer without them.
        return self.formatter_class(prog=self.prog, width=_terminal_width())  # type: ignore[call-arg]

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"qcowlib: error: {message}\n")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """An invalid choice (a command or an option value) says what was probably meant."""
        if action.choices is None or value in action.choices:
            return
        choices = ", ".join(map(repr, action.choices))
        message = f"invalid choice: {value!r} (choose from {choices})"
        close = did_you_mean(str(value), [str(c) for c in action.choices])
        if close:
            what = "command" if isinstance(action, argparse._SubParsersAction) else "choice"
            message = f"unknown {what} {value!r}; did you mean {close}?"
        raise argparse.ArgumentError(action, message)


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
    p.add_argument(
        "--output",
        choices=("human", "json"),
        default="human",
        help="human-readable text (default) or JSON with qemu-img's keys",
    )


def add_format_options(
    p: argparse.ArgumentParser,
    help: str = "output format options, key=value,... (may repeat; -o help lists them)",
) -> None:
    """``-o OPTIONS``, repeatable, as qemu-img takes it (parsed by :func:`parse_options`)."""
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS", help=help)


def print_json(value: Any) -> None:
    import json

    text = json.dumps(value, indent=4)
    if "\\udc" in text:
        # File and snapshot names that are not UTF-8 are carried as lone surrogates
        # (U+DC80-U+DCFF); qemu-img's JSON shows such bytes as U+FFFD, and lone
        # surrogates are not valid Unicode for strict JSON readers.
        import re

        text = re.sub(r"(?<!\\ud[89ab][0-9a-f]{2})\\udc[89a-f][0-9a-f]", r"\\ufffd", text)
    sys.stdout.write(text + "\n")


# -- commands ------------------------------------------------------------------------------


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


#: qemu's cache modes (bdrv_parse_cache_mode); "off" is qemu's other name for "none".
CACHE_MODES = ("none", "off", "writeback", "writethrough", "directsync", "unsafe")
#: qemu-img convert's MAX_COROUTINES.
MAX_COROUTINES = 16


def check_cache(mode: str | None, what: str = "cache") -> None:
    """Accept qemu's cache modes (``-t``/``-T``), refuse others as qemu-img does.

    Outputs are always written whole and flushed (fsync) before they appear, whatever
    the mode; the modes are accepted so that qemu-img command lines carry over."""
    if mode is not None and mode not in CACHE_MODES:
        raise Failed(f"Invalid {what} option: {mode}")


# -- parser -------------------------------------------------------------------------------


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser (exposed for the CLI reference and tests).

    With ``only`` (a command name), just that command's parser is built: a run of one
    command does not pay for building (and importing) every other command's options.
    """
    parser = _Parser(
        prog="qcowlib",
        description="Inspect, check, convert, flatten and upload virtual disk images "
        f"({', '.join(INPUT_FORMATS)}), with qemu-img's options and output.",
        epilog=f"Run 'qcowlib COMMAND --help' for a command's options and examples. "
        f"Documentation: {DOCS}.",
    )
    parser.add_argument(
        "--version", action=_VersionAction, nargs=0, help="print the version and exit"
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser, title="commands"
    )
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
    for command in sub.choices.values():
        # --debug after the command too; SUPPRESS: absent, it leaves the global one alone
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
        )
        # Taken out of the command line before parsing (_take_secret_options); listed
        # here for --help, completion and the reference.
        command.add_argument(
            "--object",
            metavar="SPEC",
            action="append",
            default=argparse.SUPPRESS,
            help="secret,id=ID,data=TEXT or secret,id=ID,file=PATH: a passphrase for "
            "--image-opts key-secret=ID (as qemu-img; may repeat)",
        )
        command.add_argument(
            "--image-opts",
            action="store_true",
            default=argparse.SUPPRESS,
            help="image names are option strings: driver=FMT,file.filename=PATH,"
            "key-secret=ID (encrypted images, as qemu-img)",
        )
    return parser


def _register_core(sub: argparse._SubParsersAction[_Parser], name: str) -> None:
    """info, map, compare and convert (their parsers and handlers: cli/cmd_image.py)."""
    from qcowlib.cli import cmd_image

    cmd_image.register_one(sub, name)


DEBUG_HELP = "on an error, show its traceback; log debugging detail to stderr"


def add_input_format(p: argparse.ArgumentParser, flag: str = "-f", dest: str = "format") -> None:
    """``-f FMT``: the source's format (probed from its content when not given)."""
    p.add_argument(
        flag,
        dest=dest,
        choices=INPUT_FORMATS,
        metavar="FMT",
        help="the image's format (default: probed from its content, never from its name): "
        + ", ".join(INPUT_FORMATS),
    )


#: Every command, in help order, and the module under qcowlib.cli that registers it
#: through ``register(sub)`` (None: this module).  Each command has ``help=`` (one line),
#: ``description=`` and ``epilog=examples(...)``, and each option a ``help=`` text:
#: tests/cli/test_help.py walks the parser for them and runs every example.
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
    "snapshot": "cmd_snapshot",
    "amend": "cmd_amend",
    "bitmap": "cmd_bitmap",
    "dd": "cmd_dd",
    "flatten": "cmd_flatten",
    "check": "cmd_check",
    "checksum": "cmd_checksum",
    "validate": "cmd_validate",
    "upload": "cmd_upload",
    "completion": "cmd_completion",
}


class _VersionAction(argparse.Action):
    """``--version``: ``qcowlib.__version__``, the one source of the version (the build
    reads it too: pyproject.toml [tool.hatch.version])."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from qcowlib import __version__

        sys.stdout.write(f"qcowlib {__version__}\n")
        parser.exit(0)


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
    if not objects and not image_opts:
        return contextlib.nullcontext()
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


#: Commands whose work is a few metadata reads: the cyclic garbage collector stays off
#: for them (their run is start-up, imports, a little I/O; nothing they make is cyclic
#: garbage worth collecting before the process ends).
_SHORT_COMMANDS: Final = frozenset({"info", "map", "check", "validate"})


def failure_status(command: str | None) -> int:
    """The exit status of a failed ``command``: 1, but 2 for ``compare``, whose 1 means
    "the images differ" (as qemu-img)."""
    return 2 if command == "compare" else 1


def command_of(argv: Sequence[str]) -> str | None:
    """The command an argument list names (its first argument that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


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
    parser = build_parser(command_of(argv))
    if "resize" in argv and argv and re.match(r"^-\d", argv[-1]) and "--" not in argv:
        argv.insert(len(argv) - 1, "--")  # "resize FILE -3M": a size, not an option
    args = _parse(parser, argv)
    if args.command not in _SHORT_COMMANDS:
        gc.enable()  # off for start-up (qcowlib.__main__); long runs collect cycles
    configure_on_use(lambda: _configure_logging(args.debug))
    func: Callable[[argparse.Namespace], int] = args.func
    error_status = failure_status(args.command)
    if args.debug:  # logging loads only when something is logged (qcowlib._log)
        shown = {k: v for k, v in vars(args).items() if k not in ("func", "parser")}
        log.debug("%s %s", args.command, shown)
    try:
        with _image_keys(args, objects, image_opts):
            return func(args)
    except Failed as exc:
        _traceback(args)
        sys.stderr.write(f"qcowlib: error: {exc}\n")
        return exc.status
    except QcowlibError as exc:
        _traceback(args)
        sys.stderr.write(f"qcowlib: error: {exc}\n")
        return error_status
    except KeyboardInterrupt as exc:
        _traceback(args)
        from qcowlib.core import interrupt

        return interrupt.report(exc)
    except BrokenPipeError:
        return error_status
    except OSError as exc:
        _traceback(args)
        sys.stderr.write(f"qcowlib: error: {exc}\n")
        return error_status
    except Exception as exc:  # a bug: no traceback for users unless they ask (--debug)
        from qcowlib.core import interrupt

        if (signalled := interrupt.cause(exc)) is not None:
            return interrupt.report(signalled)
        _traceback(args)
        sys.stderr.write(f"qcowlib: error: internal error: {type(exc).__name__}: {exc}\n")
        return error_status


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; an unknown option is a usage error of its command, with the
    options it probably meant."""
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command: argparse.ArgumentParser = sub.choices.get(args.command, parser)
    known = [o for a in command._actions for o in a.option_strings]
    unknown = [w for w in extra if w.startswith("-")]
    hints = []
    for word in unknown:
        close = did_you_mean(word.partition("=")[0], known)
        if close:
            prefix = f"{word}: " if len(unknown) > 1 else ""
            hints.append(f"{prefix}did you mean {close}?")
    message = f"unrecognized arguments: {' '.join(extra)}"
    if hints:
        message += f" ({' '.join(hints)})"
    return command.error(message)


def _traceback(args: argparse.Namespace) -> None:
    """With ``--debug``, the traceback of the error being handled, before its one line."""
    if args.debug:
        import traceback

        traceback.print_exc(file=sys.stderr)
