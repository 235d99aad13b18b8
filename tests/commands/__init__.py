"""Tests of the ``moe-devkit`` subcommands, one module per ``moe_devkit.commands`` module
(a package, so that their names may repeat those of tests/diagnostics and tests/inspect)."""
