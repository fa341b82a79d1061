"""`python -m billing.bench [--quick] [--workers N] [--duration S]`, the same as `billing bench`."""

from __future__ import annotations

import sys

from billing.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
