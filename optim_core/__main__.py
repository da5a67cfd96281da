"""``python -m optim_core``: the article's linear regression trained by every optimizer."""

from __future__ import annotations

import sys

from .demo import main

if __name__ == "__main__":
    sys.exit(main())
