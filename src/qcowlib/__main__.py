"""``python -m qcowlib`` and the ``qcowlib`` console script.

Signal handling comes first, before the command line's modules are imported: a Ctrl-C
or SIGTERM during start-up ends the program with the signal's exit status and no
traceback (:mod:`qcowlib.core.interrupt`).
"""

from __future__ import annotations

import sys

from qcowlib.core import interrupt


def run() -> int:
    """Run the command line; returns the exit status."""
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
