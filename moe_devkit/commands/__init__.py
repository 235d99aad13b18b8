"""Implementations of the CLI's subcommands (imported lazily by ``moe_devkit.cli``)."""
