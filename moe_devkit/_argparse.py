"""The command lines' argparse: a usage error is one line on stderr and exit 2."""

from __future__ import annotations

import argparse

TYPE_CHECKING = False  # typing is not imported at run time: check-debug starts faster
if TYPE_CHECKING:
    from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's usage-error form: one line on stderr, exit 2 (``--help`` still
    prints the full usage). Subparsers are made of the same class."""

    def error(self, message: str) -> NoReturn:
        """Prints ``PROG: error: MESSAGE`` as one line and exits 2."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.splitlines())}\n")
