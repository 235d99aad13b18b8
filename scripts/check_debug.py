"""Pre-commit entry point for check-debug (see moe_devkit/lint)."""

import sys
from pathlib import Path

# `python scripts/check_debug.py` puts scripts/ on sys.path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_devkit.lint import main

if __name__ == "__main__":
    raise SystemExit(main())
