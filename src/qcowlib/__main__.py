"""``python -m qcowlib``."""

import sys

from qcowlib.cli import main

sys.exit(main())
