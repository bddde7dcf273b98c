"""Which cloud to talk to: openstacksdk's own configuration, with errors that say what to set.

The cloud is chosen exactly as the ``openstack`` client chooses it, by openstacksdk's
``openstack.config``: ``--os-cloud NAME`` or ``OS_CLOUD`` naming an entry of
``clouds.yaml`` (looked for in the current directory, ``~/.config/openstack`` and
``/etc/openstack``, or the file named by ``OS_CLIENT_CONFIG_FILE``), or the ``OS_*``
environment variables and ``--os-*`` options.  The command line registers the options
through ``OpenStackConfig.register_argparse_arguments`` (all of them: ``--os-auth-url``,
``--os-password``, ``--os-region-name``, ``--os-image-endpoint-override``, ...) and
builds the connection from what was parsed with ``OpenStackConfig.get_one``.

openstacksdk's own messages do not say where it looked (``Auth plugin requires
parameters which were not given: auth_url``, ``Cloud mycloud was not found.``); every
failure here becomes a :class:`CloudConfigError` that names the files searched and the
options and variables that would fix it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qcowlib.errors import QcowlibError

#: Where ``clouds.yaml`` is documented to be looked for (openstacksdk's search path).
CLOUDS_FILES = "clouds.yaml, clouds.yml or clouds.json"


class CloudConfigError(QcowlibError):
    """No usable cloud configuration; the message says what to configure and where."""


@dataclass
class CloudSetup:
    """The configuration loaded for a command line and the argparse dests it registered."""

    config: Any  # openstack.config.loader.OpenStackConfig
    dests: tuple[str, ...]

    def namespace(self, args: argparse.Namespace) -> argparse.Namespace:
        """Only the cloud options of ``args`` (get_one merges every key it is given)."""
        return argparse.Namespace(**{d: getattr(args, d, None) for d in self.dests})


def _openstack_config() -> Any:
    try:
        from openstack import config as os_config
    except ImportError:
        raise CloudConfigError(
            "uploading needs openstacksdk: pip install 'qcowlib[glance]'"
        ) from None
    try:
        return os_config.OpenStackConfig(app_name="qcowlib")
    except Exception as exc:  # a clouds.yaml that is not a mapping, and the like
        raise CloudConfigError(f"cannot read the cloud configuration: {_first_line(exc)}") from None


def register_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> CloudSetup:
    """Add openstacksdk's ``--os-*`` options (and ``OS_*`` defaults) to ``parser``.

    ``argv`` is the command's own arguments: openstacksdk peeks at ``--os-cloud`` and
    ``--os-auth-type`` in it to register the options of the right auth plugin, and
    rewrites ``--os_x`` spellings to ``--os-x`` in place, as the ``openstack`` client
    accepts them.  Raises :class:`CloudConfigError` for a cloud that does not exist or
    an unknown auth type.
    """
    config = _openstack_config()
    # By identity, as --os-cloud may be replaced.  The list keeps the old actions alive:
    # an action openstacksdk removes could otherwise be freed and its id reused by a new
    # one, whose option would then go missing from the namespace (a flaky "needs
    # auth_url" for --os-auth-type none).
    kept = list(parser._actions)
    before = {id(a) for a in kept}
    try:
        config.register_argparse_arguments(parser, argv, service_keys=["image"])
    except Exception as exc:
        raise CloudConfigError(explain(exc, config, _peek_cloud(argv))) from None
    dests = tuple(dict.fromkeys(a.dest for a in parser._actions if id(a) not in before))
    del kept
    return CloudSetup(config, dests)


def connect(
    setup: CloudSetup | None = None,
    args: argparse.Namespace | None = None,
    cloud: str | None = None,
) -> Any:
    """An ``openstack.connection.Connection`` from parsed options, or from a cloud name.

    Without ``setup`` the configuration is read now (``cloud`` or ``OS_CLOUD`` and the
    ``OS_*`` variables).  Makes no network request.  Raises :class:`CloudConfigError`.
    """
    config = setup.config if setup is not None else _openstack_config()
    options = setup.namespace(args) if setup is not None and args is not None else None
    name = cloud or (getattr(options, "os_cloud", None) if options is not None else None)
    try:
        region = config.get_one(cloud=cloud, argparse=options)
        from openstack import connection

        return connection.Connection(config=region)
    except Exception as exc:  # openstacksdk and keystoneauth raise many types here
        raise CloudConfigError(explain(exc, config, name or os.environ.get("OS_CLOUD"))) from None


def explain(exc: BaseException, config: Any, cloud: str | None) -> str:
    """openstacksdk's configuration error, with where it looked and what to set."""
    text = _first_line(exc)
    where = searched(config)
    missing = _missing_options(exc)
    names = sorted(config.get_cloud_names()) if hasattr(config, "get_cloud_names") else []
    names = [n for n in names if n != "envvars"]
    if cloud and "not found" in text.lower():
        have = f"it defines {', '.join(names)}" if names else "it defines no clouds"
        if config.config_filename:
            return (
                f"cloud {cloud!r} (from --os-cloud or OS_CLOUD) is not in "
                f"{config.config_filename} ({have}); searched {where}"
            )
        return f"cloud {cloud!r} (from --os-cloud or OS_CLOUD) not found: no {where}"
    if missing:
        needs = ", ".join(missing)
        flags = ", ".join(f"--os-{m.replace('_', '-')}" for m in missing)
        envs = ", ".join(f"OS_{m.upper()}" for m in missing)
        if cloud:
            source = config.config_filename or "no clouds file"
            return (
                f"cloud {cloud!r} ({source}) lacks {needs}: add it to the cloud's auth "
                f"section, or give {flags} or {envs}"
            )
        found = (
            f"{config.config_filename} defines {', '.join(names) or 'no clouds'}"
            if config.config_filename
            else f"no {where}"
        )
        return (
            f"no cloud configured ({found}): give --os-cloud NAME or set OS_CLOUD for a "
            f"cloud in clouds.yaml, or set the OS_* variables (OS_AUTH_URL and the rest, "
            f"or the --os-* options); the auth plugin still needs {needs} ({envs})"
        )
    return f"cannot configure the cloud connection: {text} (searched {where})"


def searched(config: Any) -> str:
    """The clouds files openstacksdk looks for, grouped by directory, in its order."""
    files: list[str] = list(getattr(config, "_config_files", []) or [])
    override = os.environ.get("OS_CLIENT_CONFIG_FILE")
    dirs: list[str] = []
    for path in files:
        if override and path == override:
            continue
        d = os.path.dirname(path)
        if d not in dirs:
            dirs.append(d)
    parts = [f"{CLOUDS_FILES} in {', '.join(dirs)}"] if dirs else []
    if override:
        parts.insert(0, f"OS_CLIENT_CONFIG_FILE={override}")
    return "; ".join(parts) or CLOUDS_FILES


def _missing_options(exc: BaseException) -> list[str]:
    options = getattr(exc, "options", None)
    if not options:
        return []
    names = []
    for opt in options:
        dest = getattr(opt, "dest", None) or getattr(opt, "name", None) or str(opt)
        names.append(str(dest).replace("-", "_"))
    return names


def _peek_cloud(argv: Sequence[str]) -> str | None:
    """``--os-cloud NAME`` / ``--os-cloud=NAME`` in argv, else ``OS_CLOUD``."""
    for i, arg in enumerate(argv):
        if arg in ("--os-cloud", "--os_cloud") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(("--os-cloud=", "--os_cloud=")):
            return arg.partition("=")[2]
    return os.environ.get("OS_CLOUD") or None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
