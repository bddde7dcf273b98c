"""Keys for encrypted images, given the qemu-img way.

qemu-img takes secrets as objects (``--object secret,id=sec0,data=...`` or
``file=PATH``) and ties one to an image with ``--image-opts`` (``key-secret=sec0`` for
LUKS, ``encrypt.key-secret=sec0`` for qcow2).  Here the resulting passphrases are held
per image path in a context variable: the CLI (or an API caller, with
:func:`image_keys`) sets them around an operation and each reader of an encrypted
format asks :func:`image_key` for its own file when it opens.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

from qcowlib._units import split_qemu_opts
from qcowlib.errors import InvalidArgument

_KEYS: ContextVar[Mapping[str, bytes] | None] = ContextVar("qcowlib_image_keys", default=None)


def _key_path(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.fspath(path))


@contextmanager
def image_keys(keys: Mapping[str | os.PathLike[str], bytes | str]) -> Iterator[None]:
    """Within the block, images at these paths are opened with these passphrases."""
    merged = dict(_KEYS.get() or {})
    for path, key in keys.items():
        merged[_key_path(path)] = key.encode() if isinstance(key, str) else bytes(key)
    token = _KEYS.set(merged)
    try:
        yield
    finally:
        _KEYS.reset(token)


def image_key(path: str | os.PathLike[str]) -> bytes | None:
    """The passphrase given for the image at ``path``, if any."""
    return (_KEYS.get() or {}).get(_key_path(path))


def parse_secret_object(spec: str) -> tuple[str, bytes]:
    """``secret,id=ID,data=TEXT|file=PATH[,format=raw|base64]`` -> (id, passphrase).

    Raises :class:`InvalidArgument` for other object types and malformed specs.
    """
    kind, _, rest = spec.partition(",")
    opts = dict(item.partition("=")[::2] for item in split_qemu_opts(rest) if item)
    if kind != "secret":
        raise InvalidArgument(f"--object {kind!r} is not supported (only 'secret')")
    name = opts.pop("id", "")
    if not name:
        raise InvalidArgument("--object secret needs an id")
    fmt = opts.pop("format", "raw")
    if ("data" in opts) == ("file" in opts):
        raise InvalidArgument(f"secret {name!r} needs exactly one of data= and file=")
    if "keyid" in opts or "iv" in opts:
        raise InvalidArgument(f"secret {name!r}: encrypted secrets (keyid=) are not supported")
    if opts.keys() - {"data", "file"}:
        raise InvalidArgument(f"secret {name!r}: unknown option {sorted(opts)[0]!r}")
    if "data" in opts:
        raw = opts["data"].encode()
    else:
        try:
            with open(opts["file"], "rb") as f:
                raw = f.read(1 << 20)
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read secret file {opts['file']!r}: {exc.strerror}"
            ) from None
    if fmt == "base64":
        try:
            import base64  # only for --object secret,format=base64

            raw = base64.b64decode(raw, validate=True)
        except ValueError:
            raise InvalidArgument(f"secret {name!r} is not valid base64") from None
    elif fmt != "raw":
        raise InvalidArgument(f"secret {name!r}: format must be raw or base64")
    return name, raw


def parse_image_opts(text: str) -> tuple[str, str | None, str | None]:
    """``driver=FMT,file.filename=PATH,key-secret=ID`` -> (path, format, secret id).

    ``encrypt.key-secret`` (qcow2) and ``key-secret`` (luks) both name the secret.
    """
    opts: dict[str, str] = {}
    for item in split_qemu_opts(text):
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidArgument(f"--image-opts: {item!r} is not KEY=VALUE")
        opts[key] = value
    path = opts.pop("file.filename", None) or opts.pop("filename", None)
    if not path:
        raise InvalidArgument("--image-opts needs file.filename=PATH")
    fmt = opts.pop("driver", None)
    secret = opts.pop("encrypt.key-secret", None) or opts.pop("key-secret", None)
    opts.pop("file.driver", None)
    if opts:
        raise InvalidArgument(f"--image-opts: option {sorted(opts)[0]!r} is not supported")
    return path, fmt, secret
