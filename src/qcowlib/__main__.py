"""``python -m qcowlib`` and the ``qcowlib`` console script.

Signal handling comes first, before the command line's modules are imported: a Ctrl-C
or SIGTERM during start-up ends the program with the signal's exit status and no
traceback (:mod:`qcowlib.core.interrupt`).
"""

from __future__ import annotations

import gc
import sys

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
        from qcowlib.cli import main

        status = main()
    except KeyboardInterrupt as exc:  # before main() could catch it (start-up)
        status = interrupt.report(exc)
    interrupt.ignore_further()  # the work is done: a late signal changes nothing
    return status


if __name__ == "__main__":
    sys.exit(run())
