"""``python -m optim_core``: the ``optim-core`` command line (see :mod:`optim_core.tools.cli`)."""

from __future__ import annotations

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
