"""A real Glance API server for tests, on 127.0.0.1, with no Keystone.

``GlanceServer`` writes a throw-away configuration (SQLite database, filesystem store,
staging and tasks stores, the unauthenticated paste pipeline, an allow-all policy) from
the templates in ``tests/glance/``, creates the database with ``glance-manage db sync``
and serves Glance's WSGI application ``glance.wsgi.api:application`` under pyuwsgi, one
process with one thread, on a free loopback port.  Glance and pyuwsgi come from the
separate virtualenv ``.venv-glance`` that ``tools/glance-env`` creates; the client side
(openstacksdk) is imported from the project's own environment, lazily.

Use it directly::

    with GlanceServer() as server:
        conn = server.connection()
        conn.image.create_image(name="x", data=chunks, disk_format="raw",
                                container_format="bare", size=n)

or through the session fixture ``glance_server`` (import it into a conftest or a test
module), which skips when ``.venv-glance`` is missing locally and, under ``CI=true``,
creates it with ``tools/glance-env`` and fails when Glance cannot be started.

For command-line tests, :meth:`GlanceServer.clouds_yaml` writes a clouds.yaml entry and
:func:`environment_for_cli` an environment in which ``--os-cloud NAME`` finds it.
``GlanceServer(pipeline="context")`` serves a pipeline that trusts identity headers
instead, for interoperable import (stage + import), which needs a project.

The server listens on 127.0.0.1 only, runs in its own process group, gets SIGTERM if
the test process dies, and is stopped (SIGTERM, then SIGKILL) when the block ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pytest

if TYPE_CHECKING:
    import openstack.connection

LOG = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "glance"
GLANCE_ENV_SCRIPT = REPO_ROOT / "tools" / "glance-env"
#: The virtualenv with Glance and pyuwsgi (override with the GLANCE_VENV variable).
DEFAULT_VENV = Path(os.environ.get("GLANCE_VENV") or REPO_ROOT / ".venv-glance")

IN_CI = os.environ.get("CI") == "true"

#: ``"unauthenticated"``: every request is an admin without a project (the stock
#: no-auth pipeline).  ``"context"``: Glance trusts the ``X-Identity-Status``,
#: ``X-Project-Id``, ``X-User-Id`` and ``X-Roles`` headers the client sends (interoperable
#: import needs a project, which the unauthenticated context lacks).
Pipeline = Literal["unauthenticated", "context"]
_FLAVORS: dict[str, str] = {"unauthenticated": "", "context": "context"}

_PR_SET_PDEATHSIG = 1
_LOG_TAIL_LINES = 40
_BIND_RETRIES = 3


class GlanceServerError(RuntimeError):
    """Glance could not be set up, started or stopped; the message says why."""


def venv_ready(venv: Path = DEFAULT_VENV) -> bool:
    """True when ``venv`` has what the server needs (python, uwsgi, glance-manage)."""
    return all((venv / "bin" / tool).is_file() for tool in ("python", "uwsgi", "glance-manage"))


def ensure_venv(venv: Path = DEFAULT_VENV, timeout: float = 900.0) -> Path:
    """Run ``tools/glance-env`` (instant when already done) and return the venv.

    Raises:
        GlanceServerError: the script failed or took longer than ``timeout`` seconds.
    """
    env = dict(os.environ, GLANCE_VENV=str(venv))
    try:
        done = subprocess.run(
            ["bash", str(GLANCE_ENV_SCRIPT)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise GlanceServerError(f"tools/glance-env took more than {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise GlanceServerError(
            f"tools/glance-env failed with exit status {done.returncode}:\n"
            f"{_tail(done.stderr + done.stdout)}"
        )
    return venv


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook that makes the child get SIGTERM when the test process dies.

    The libc function is looked up here, in the parent, so that the child only calls it.
    None where there is no ``prctl`` (not Linux).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def hook() -> None:  # pragma: no cover - runs in the child, between fork and exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return hook


class GlanceServer:
    """A Glance API server on ``127.0.0.1`` for the duration of a ``with`` block.

    Args:
        venv: virtualenv with glance and pyuwsgi (``tools/glance-env`` makes it).
        workdir: where config, database, logs and images go; a new temporary directory
            (removed on exit) when None.  A given directory is kept.
        pipeline: which paste pipeline serves the API (see :data:`Pipeline`).
        start_timeout: seconds to wait for ``/healthcheck`` to answer 200.
        stop_timeout: seconds to wait after SIGTERM before killing the server.
        project_id, user_id: the identity the ``context`` pipeline's client claims.
    """

    def __init__(
        self,
        venv: Path = DEFAULT_VENV,
        *,
        workdir: Path | None = None,
        pipeline: Pipeline = "unauthenticated",
        start_timeout: float = 60.0,
        stop_timeout: float = 15.0,
        project_id: str = "qcowlib-test-project",
        user_id: str = "qcowlib-test-user",
    ) -> None:
        self.venv = venv
        self.project_id = project_id
        self.user_id = user_id
        self.pipeline: Pipeline = pipeline
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._given_workdir = workdir
        self._workdir: Path | None = None
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        #: Seconds the last start and stop took (None until they happened).
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None

    # -- public surface -------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        """The directory holding config, database, stores and ``uwsgi.log``."""
        if self._workdir is None:
            raise GlanceServerError("the Glance server has not been started")
        return self._workdir

    @property
    def port(self) -> int:
        """The loopback port the server listens on."""
        if self._port is None:
            raise GlanceServerError("the Glance server has not been started")
        return self._port

    @property
    def endpoint(self) -> str:
        """The image endpoint, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_dir(self) -> Path:
        """The directory given to Glance as ``OS_GLANCE_CONFIG_DIR``."""
        return self.workdir / "etc"

    @property
    def log_path(self) -> Path:
        """uWSGI's and Glance's combined output."""
        return self.workdir / "uwsgi.log"

    @property
    def pid(self) -> int | None:
        """The uWSGI master's process id (also its process group id) while started."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log ('' when there is none yet)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, GlanceServerError):
            return ""
        return _tail(text, lines)

    def identity_headers(self) -> dict[str, str]:
        """The headers Glance's ``context`` pipeline trusts in place of Keystone's token."""
        return {
            "X-Identity-Status": "Confirmed",
            "X-Project-Id": self.project_id,
            "X-User-Id": self.user_id,
            "X-Roles": "admin,member,reader",
        }

    def connection(self, **kwargs: Any) -> openstack.connection.Connection:
        """An openstacksdk connection to this server, as an operator's client would make.

        With the ``unauthenticated`` pipeline: ``auth_type="none"`` and an image endpoint
        override, exactly what :meth:`clouds_yaml` writes.  With ``context``: a
        keystoneauth session without auth that sends :meth:`identity_headers`.
        ``kwargs`` go to ``Connection``.
        """
        import openstack.connection

        if self.pipeline == "context":
            from keystoneauth1 import noauth, session

            sess = session.Session(
                auth=noauth.NoAuth(endpoint=self.endpoint),
                additional_headers=self.identity_headers(),
            )
            return openstack.connection.Connection(
                session=sess, image_endpoint_override=self.endpoint, **kwargs
            )
        return openstack.connection.Connection(
            auth_type="none", image_endpoint_override=self.endpoint, **kwargs
        )

    def cloud_config(self) -> dict[str, Any]:
        """The clouds.yaml entry for this server (as openstacksdk reads it)."""
        return {"auth_type": "none", "image_endpoint_override": self.endpoint}

    def clouds_yaml(self, path: Path, name: str = "qcowlib-test") -> Path:
        """Write (or add to) a clouds.yaml at ``path`` with a cloud ``name`` for this server.

        The file is written as JSON, which is valid YAML; an existing file must be JSON
        too (one this method wrote).  Use it with ``OS_CLIENT_CONFIG_FILE=path`` and
        ``--os-cloud name``.  Only for the ``unauthenticated`` pipeline: clouds.yaml has
        no way to send the ``context`` pipeline's identity headers.
        """
        if self.pipeline != "unauthenticated":
            raise GlanceServerError("clouds.yaml entries need the unauthenticated pipeline")
        clouds: dict[str, Any] = {}
        if path.exists():
            try:
                clouds = dict(json.loads(path.read_text())["clouds"])
            except (ValueError, KeyError, TypeError) as exc:
                raise GlanceServerError(
                    f"{path} exists and is not a clouds file written by GlanceServer"
                ) from exc
        clouds[name] = self.cloud_config()
        path.write_text(json.dumps({"clouds": clouds}, indent=2) + "\n")
        return path

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> GlanceServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Write the config, create the database and start the server; wait until healthy.

        Raises:
            GlanceServerError: the venv is incomplete, ``db sync`` failed, or the server
                exited or did not answer ``/healthcheck`` within ``start_timeout``
                (the message ends with the log's last lines).
        """
        if self._proc is not None:
            raise GlanceServerError("the Glance server is already started")
        if not venv_ready(self.venv):
            raise GlanceServerError(
                f"{self.venv} has no glance/uwsgi: run tools/glance-env to create it"
            )
        began = time.monotonic()
        if self._given_workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="qcowlib-glance-"))
        else:
            self._workdir = self._given_workdir
            self._workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._write_config()
            self._db_sync()
            for attempt in range(1, _BIND_RETRIES + 1):
                self._port = free_port()
                self._write_uwsgi_ini()
                if self._spawn_and_wait(began + self.start_timeout, last=attempt == _BIND_RETRIES):
                    break
        except BaseException:
            self.stop(keep_workdir=True)  # the log stays there for a look
            raise
        self.start_seconds = time.monotonic() - began
        LOG.info("Glance is up at %s after %.2f s", self.endpoint, self.start_seconds)

    def stop(self, *, keep_workdir: bool = False) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``stop_timeout``); idempotent.

        Removes the working directory when it was a temporary one, unless
        ``keep_workdir`` (a failed start keeps it, for its log).
        """
        began = time.monotonic()
        proc, self._proc = self._proc, None
        if proc is not None:
            self._terminate(proc)
            self.stop_seconds = time.monotonic() - began
            LOG.info("Glance stopped after %.2f s", self.stop_seconds)
        if self._given_workdir is None and self._workdir is not None and not keep_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # -- internals ------------------------------------------------------------------

    def _fill(self, template: str, **fields: str) -> str:
        text = (TEMPLATES / template).read_text()
        return string.Template(text).substitute(fields)

    def _write_config(self) -> None:
        work = self.workdir
        etc = self.config_dir
        stores = ("images", "images2", "staging", "tasks", "locks")
        for sub in (etc, *(work / name for name in stores)):
            sub.mkdir(parents=True, exist_ok=True)
        (work / "image-cache").mkdir(exist_ok=True)
        fields = {
            "workdir": str(work),
            "flavor": _FLAVORS[self.pipeline],
            "python": str(self.venv / "bin" / "python"),
        }
        # The paste ini and policy live beside glance-api.conf, which names them by path.
        (work / "glance-api-paste.ini").write_text(self._fill("glance-api-paste.ini", **fields))
        (work / "policy.yaml").write_text(self._fill("policy.yaml"))
        (etc / "glance-api.conf").write_text(self._fill("glance-api.conf", **fields))

    def _write_uwsgi_ini(self) -> None:
        mercy = str(max(1, int(self.stop_timeout // 3)))
        ini = self._fill("uwsgi.ini", port=str(self.port), mercy=mercy)
        (self.workdir / "uwsgi.ini").write_text(ini)

    def _child_env(self) -> dict[str, str]:
        """The server's environment: ours minus Python/venv settings, plus the config dir.

        ``OS_GLANCE_CONFIG_DIR`` must be in the real environment: an ``env =`` line in the
        uWSGI ini does not reach ``os.environ`` under pyuwsgi.
        """
        drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "OS_CLOUD"}
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env["OS_GLANCE_CONFIG_DIR"] = str(self.config_dir)
        env["VIRTUAL_ENV"] = str(self.venv)
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
        return env

    def _db_sync(self, timeout: float = 120.0) -> None:
        conf = self.config_dir / "glance-api.conf"
        argv = [str(self.venv / "bin" / "glance-manage"), "--config-file", str(conf)]
        argv += ["db", "sync"]
        try:
            done = subprocess.run(
                argv,
                env=self._child_env(),
                cwd=self.workdir,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise GlanceServerError(f"glance-manage db sync took more than {timeout} s") from exc
        if done.returncode != 0:
            raise GlanceServerError(
                f"glance-manage db sync failed with exit status {done.returncode}:\n"
                f"{_tail(done.stderr + done.stdout)}"
            )

    def _spawn_and_wait(self, deadline: float, *, last: bool) -> bool:
        """Start uWSGI and wait for health.  False: the port was taken, try another."""
        argv = [str(self.venv / "bin" / "uwsgi"), "--ini", str(self.workdir / "uwsgi.ini")]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv,
                env=self._child_env(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends master + worker
                preexec_fn=_parent_death_signal(),  # noqa: PLW1509 - only calls prctl
            )
        url = f"{self.endpoint}/healthcheck"
        while True:
            status = self._proc.poll()
            if status is not None:
                self._proc = None
                if not last and "Address already in use" in self.log_tail():
                    LOG.warning("port %d was taken; retrying on another", self.port)
                    return False
                raise GlanceServerError(
                    f"Glance (uWSGI) exited with status {status} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if _healthy(url):
                return True
            if time.monotonic() > deadline:
                raise GlanceServerError(
                    f"Glance did not answer {url} with 200 within {self.start_timeout:.0f} s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM the master, wait, then SIGKILL whatever is left of its process group."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                LOG.warning(
                    "Glance did not stop within %.0f s of SIGTERM; killing it", self.stop_timeout
                )
        # Whatever is still in the server's own process group (a worker outliving its
        # master, or a master that ignored SIGTERM) is killed.  The group is the one
        # start_new_session made for this child, so nothing else is in it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired as exc:  # pragma: no cover - SIGKILL cannot hang
            raise GlanceServerError(f"Glance process {proc.pid} did not die") from exc


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


# -- pytest integration ------------------------------------------------------------------


def require_openstacksdk() -> None:
    """Skip locally when openstacksdk is not importable; under CI=true that is a failure."""
    try:
        import openstack  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("openstacksdk is required under CI=true (the project's test extra)")
        pytest.skip("openstacksdk is not installed in this environment")


def _start_for_pytest(venv: Path, pipeline: Pipeline) -> GlanceServer:
    """Skip, install (under CI=true) or fail as the fixture documents; return a running server."""
    problem = None
    if not venv_ready(venv):
        if not IN_CI:
            pytest.skip(f"{venv} is missing: run tools/glance-env to test against Glance")
        try:
            ensure_venv(venv)
        except GlanceServerError as exc:
            problem = f"cannot install Glance under CI=true: {exc}"
    if problem is None:
        server = GlanceServer(venv, pipeline=pipeline)
        try:
            server.start()
        except GlanceServerError as exc:
            problem = f"cannot start Glance: {exc}"
        else:
            return server
    pytest.fail(problem, pytrace=False)


class _Shared:
    """The session's servers, one per pipeline, however many modules import the fixtures.

    pytest makes a separate session fixture for each place that imports it; they all
    share these servers (each started once, when first wanted, and stopped when the last
    of its users is torn down), and a failed start is reported to each of them without
    trying again.
    """

    servers: ClassVar[dict[str, GlanceServer]] = {}
    failures: ClassVar[dict[str, str]] = {}
    users: ClassVar[dict[str, int]] = {}


def _session_server(pipeline: Pipeline) -> Iterator[GlanceServer]:
    if pipeline in _Shared.failures:
        pytest.fail(_Shared.failures[pipeline], pytrace=False)
    if pipeline not in _Shared.servers:
        try:
            _Shared.servers[pipeline] = _start_for_pytest(DEFAULT_VENV, pipeline)
        except pytest.fail.Exception as exc:
            _Shared.failures[pipeline] = str(exc)
            raise
    _Shared.users[pipeline] = _Shared.users.get(pipeline, 0) + 1
    try:
        yield _Shared.servers[pipeline]
    finally:
        _Shared.users[pipeline] -= 1
        if _Shared.users[pipeline] == 0:
            server = _Shared.servers.pop(pipeline, None)
            if server is not None:
                server.stop()


@pytest.fixture(scope="session")
def glance_server() -> Iterator[GlanceServer]:
    """A running :class:`GlanceServer` shared by the whole session, stopped at its end.

    Skips locally without ``.venv-glance``; under ``CI=true`` creates it and fails (never
    skips) when Glance cannot be installed or started.
    """
    yield from _session_server("unauthenticated")


@pytest.fixture(scope="session")
def glance_context_server() -> Iterator[GlanceServer]:
    """Like ``glance_server``, with the ``context`` pipeline (interoperable import works;
    connect with :meth:`GlanceServer.connection`, which sends the identity headers)."""
    yield from _session_server("context")


def environment_for_cli(clouds_file: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment in which ``--os-cloud NAME`` finds the clouds written to ``clouds_file``."""
    env = dict(os.environ if base is None else base)
    for key in [k for k in env if k.startswith("OS_")]:
        del env[key]
    env["OS_CLIENT_CONFIG_FILE"] = str(clouds_file)
    return env
