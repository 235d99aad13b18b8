"""``python -m moe_devkit``: the same as the ``moe-devkit`` console script."""

from moe_devkit.cli import main

raise SystemExit(main())
