"""``python -m qcowlib`` and the ``qcowlib`` console script.

Signal handling comes first, before the command line's modules are imported: a Ctrl-C
or SIGTERM during start-up ends the program with the signal's exit status and no
traceback (:mod:`qcowlib.core.interrupt`).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
from typing import NoReturn

from qcowlib.core import interrupt


def run() -> int:
    """Run the command line; returns the exit status."""
    # Start-up creates tens of thousands of objects (modules, classes, functions) and no
    # garbage cycles; the cyclic collector walking them while imports run cost ~1.5 ms
    # of the ~40 ms of `validate` of a small image.  It is off until the command line is
    # parsed, and on again for every command but the metadata ones (cli.main).
    gc.disable()
    interrupt.install()
    try:
        from qcowlib.cli import main as cli_main

        status = cli_main()
    except KeyboardInterrupt as exc:  # before main() could catch it (start-up)
        status = interrupt.report(exc)
    interrupt.ignore_further()  # the work is done: a late signal changes nothing
    return status


def main() -> NoReturn:
    """Run the command line and exit with its status (``SystemExit``), as any program
    run inside another Python program should."""
    sys.exit(run())


def program() -> NoReturn:
    """The ``qcowlib`` program (console script, ``python -m qcowlib``): :func:`run`, then
    end the process.

    Tearing the interpreter down (clearing ~130 modules, a last full collection) costs
    7-10 ms, a fifth of ``qcowlib info`` of a small image, and does nothing for a
    process whose only work is done.  When nothing is left that needs it (no ``atexit``
    callback, such as logging's or a coverage tool's; no other thread; no ``python -i``)
    the process ends at once, once the standard streams are flushed.  Never returns:
    a program that runs qcowlib inside itself calls :func:`main` or :func:`run`.
    """
    status = _flush(run(), _failure_status())
    if _nothing_left_to_run():
        os._exit(status)
    sys.exit(status)


def _failure_status() -> int:
    try:
        from qcowlib.cli import command_of, failure_status
    except Exception:  # the command line never loaded (start-up interrupted)
        return 1
    return failure_status(command_of(sys.argv[1:]))


def _flush(status: int, failure: int) -> int:
    """Flush stdout and stderr.  A failure is the program's failure (``failure``, the
    command's error status, unless it already failed), said in one line; a reader gone
    away (``| head``) is no error to report."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
            continue
        except BrokenPipeError:
            pass
        except ValueError:  # closed by the caller's code
            continue
        except OSError as exc:
            if stream is sys.stdout:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    sys.stderr.write(f"qcowlib: error: cannot write the output: {exc.strerror}\n")
        status = failure if failure != 1 or status == 0 else status
        # What could not be written is dropped: the usual exit would retry the flush and
        # print a Python error about it.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass  # not a file descriptor: nothing more to do
    return status


def _nothing_left_to_run() -> bool:
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return False
    # CPython's count of atexit callbacks; where it is missing, assume there are some.
    callbacks: int = getattr(atexit, "_ncallbacks", lambda: 1)()
    return callbacks == 0 and not sys.flags.inspect


def _is_the_process() -> bool:
    """True when this module is the process's ``__main__`` (``python -m qcowlib``), not
    code that another program runs with ``runpy``."""
    top = sys.modules.get("__main__")
    return top is not None and vars(top) is globals()


if __name__ == "__main__":
    if _is_the_process():
        program()
    main()
