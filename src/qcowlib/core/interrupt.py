"""SIGINT, SIGTERM and SIGHUP as an exception, so that every ``finally`` runs.

By default SIGTERM and SIGHUP end a Python process on the spot: no ``finally`` clause
runs, and a new image's temporary file stays behind at full size.  The command line
calls :func:`install` first thing; from then on each of the three signals raises
:class:`Interrupted` in the main thread, which unwinds like Ctrl-C does: the temporary
output is removed (:func:`qcowlib.core.sinks.atomic_output`), an upload deletes the
Glance image it created, and the program exits ``128 + signal number`` (130, 143, 129).

Only the first signal raises; later ones are recorded and ignored, so that the clean-up
the first one started is not cut short (SIGKILL still ends the process at once).
In-place writers (commit, rebase, repair) run inside :func:`deferred`, where a signal
is only recorded, and call :func:`checkpoint` where the image is consistent: the
interruption happens there, never between two metadata updates.

The library itself installs nothing: a program importing qcowlib keeps its own
signal handling, and Ctrl-C (KeyboardInterrupt) still unwinds through the same
``finally`` clauses.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, Final

__all__ = [
    "HANDLED",
    "Interrupted",
    "checkpoint",
    "deferred",
    "describe",
    "exit_status",
    "ignore_further",
    "install",
    "report",
    "signal_name",
]

#: The signals :func:`install` turns into :class:`Interrupted`.
HANDLED: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A signal asked the program to stop (a KeyboardInterrupt, so ``except Exception``
    does not swallow it).  ``detail`` says what clean-up was done, for the last line
    the command line prints."""

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(signum)
        self.signum = signum
        self.detail = detail

    @property
    def status(self) -> int:
        """The exit status a shell reports for a process ended by this signal."""
        return 128 + self.signum


class _State:
    """Process-wide: whether a signal arrived, and how deep in :func:`deferred` we are."""

    def __init__(self) -> None:
        self.lock = _thread.allocate_lock()  # threading costs a start-up import
        self.pending: int | None = None  # recorded while deferred, not raised yet
        self.raised = False  # the first signal has been turned into an exception
        self.defer_depth = 0


_state = _State()


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state.raised:
        return  # clean-up of the first signal is running: let it finish
    if _state.defer_depth > 0:
        if _state.pending is None:
            _state.pending = signum
        return
    _state.raised = True
    raise Interrupted(signum)


def install() -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (main thread only).

    A signal the parent process ignores (``nohup`` ignores SIGHUP) stays ignored.
    """
    for sig in HANDLED:
        if signal.getsignal(sig) == signal.SIG_IGN:
            continue
        try:
            signal.signal(sig, _handler)
        except ValueError:  # not the main thread: signals are not ours to handle
            return
    if not isinstance(sys.unraisablehook, _Redeliver):
        sys.unraisablehook = _Redeliver(sys.unraisablehook)


class _Redeliver:
    """``sys.unraisablehook`` that does not let Python swallow a signal.

    A signal can land while Python runs a weak-reference callback or a ``__del__``
    (the garbage collector, a thread pool's clean-up): the exception the handler raises
    there cannot propagate, Python prints it as "Exception ignored in ..." with a
    traceback, and the command would go on to finish as if never signalled.  Such an
    :class:`Interrupted` is sent again instead, a moment later, from a helper thread:
    the handler must not run again before the callback (and this hook) have returned,
    and a real signal also wakes the main thread from a blocking call.  Anything else
    goes to the previous hook.
    """

    #: Long enough for the hook and the callback that failed to return.
    DELAY: Final = 0.005

    def __init__(self, previous: Callable[[Any], object]) -> None:
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        exc = unraisable.exc_value
        if not isinstance(exc, Interrupted):
            self.previous(unraisable)
            return
        import threading

        with _state.lock:
            _state.raised = False  # the handler raises once more, where it counts
        main = threading.main_thread().ident
        assert main is not None
        again = threading.Timer(self.DELAY, signal.pthread_kill, (main, exc.signum))
        again.daemon = True
        again.start()


def checkpoint() -> None:
    """Raise :class:`Interrupted` now if a signal arrived while deferred.

    Call it where stopping leaves everything consistent (between two chunks of an
    in-place copy); outside :func:`deferred` nothing is ever pending.
    """
    with _state.lock:
        signum = _state.pending
        if signum is None or _state.raised:
            return
        _state.pending = None
        _state.raised = True
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, a signal is recorded instead of raised; it is raised at the next
    :func:`checkpoint`, or on leaving the outermost ``deferred`` block."""
    with _state.lock:
        _state.defer_depth += 1
    try:
        yield
    finally:
        with _state.lock:
            _state.defer_depth -= 1
            outermost = _state.defer_depth == 0
    if outermost:
        checkpoint()


def ignore_further() -> None:
    """From now on the handled signals are recorded and ignored (the program is
    finishing; a late signal must not raise during shutdown)."""
    _state.raised = True


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe(exc: KeyboardInterrupt) -> str:
    """``interrupted by SIGTERM`` (and what clean-up was done, when there was some)."""
    text = f"interrupted by {signal_name(exit_status(exc) - 128)}"
    detail = getattr(exc, "detail", "")
    return f"{text}: {detail}" if detail else text


def report(exc: KeyboardInterrupt) -> int:
    """Print :func:`describe`'s line on stderr (if it still can) and return the exit
    status for ``exc``."""
    import sys

    try:  # after SIGHUP the terminal may be gone
        sys.stderr.write(f"qcowlib: error: {describe(exc)}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return exit_status(exc)


def cause(exc: BaseException) -> Interrupted | None:
    """The :class:`Interrupted` an exception arose while handling, if any.

    A signal's exception can land inside the standard library's own clean-up (between a
    ``Condition.wait`` releasing its lock and taking it back), which then fails with
    ``RuntimeError: release unlocked lock`` chained to it: the signal is the cause."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, Interrupted):
            return current
        seen.add(id(current))
        suppressed = current.__suppress_context__
        current = current.__cause__ if suppressed else current.__cause__ or current.__context__
    return None


def exit_status(exc: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, ``128 + N`` for :class:`Interrupted` by signal N."""
    return exc.status if isinstance(exc, Interrupted) else 128 + signal.SIGINT
