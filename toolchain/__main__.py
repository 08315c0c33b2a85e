"""``python -m toolchain`` is the same as the ``robustprune`` command."""

import sys

from toolchain.cli import main

sys.exit(main())
