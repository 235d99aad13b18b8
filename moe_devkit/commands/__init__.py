"""The subcommands of ``moe-devkit``: one module per command, each declaring its ``COMMAND``
(a ``moe_devkit.commands.common.Command``), which ``moe_devkit.cli`` lists.

A command module's top level stays light (argparse and this package's option helpers); what
the command's work needs (torch, rich, the diagnostics) is imported when it runs.
"""
