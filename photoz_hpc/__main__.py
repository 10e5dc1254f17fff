"""``python -m photoz_hpc`` is the same as the ``photoz-hpc`` console script."""

import sys

from photoz_hpc.cli import console_main

sys.exit(console_main())
