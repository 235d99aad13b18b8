"""Pre-commit entry point for check-debug (see moe_devkit/lint)."""

import os
import sys

# `python scripts/check_debug.py` puts scripts/ on sys.path, not the repository root (found
# with os.path: pathlib would add to the hook's start-up).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from moe_devkit.lint import main

if __name__ == "__main__":
    raise SystemExit(main())
