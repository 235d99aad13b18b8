"""Rule catalogue of check-debug: stable codes, names, messages and the names they match."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """One rule: a stable code, a name that describes the pattern, and a one-line summary.

    `unsafe_fix`: removing the statement changes what the program does besides debugging (its
    output), so `--fix` leaves it unless `--unsafe-fixes` is given too.
    """

    code: str
    name: str
    summary: str
    fixable: bool
    ruff_code: str | None = None
    unsafe_fix: bool = False


RULES: tuple[Rule, ...] = (
    Rule("DBG001", "debugger-import", "import of a debugger module or entry point", True, "T100"),
    Rule("DBG002", "debugger-call", "call of a debugger entry point", True, "T100"),
    Rule("DBG003", "builtin-breakpoint", "`breakpoint()` or the breakpoint hook", True, "T100"),
    Rule("DBG004", "dynamic-debugger-import", "debugger imported by `__import__`", True, "T100"),
    Rule("DBG101", "print-call", "`print()` in library code", True, "T201", unsafe_fix=True),
    Rule(
        "DBG102", "pprint-call", "`pprint()`/`pp()` in library code", True, "T203", unsafe_fix=True
    ),
    Rule("DBG201", "anomaly-detection-enabled", "autograd anomaly detection left on", True),
    Rule("DBG202", "cuda-sync-debug-mode", "CUDA sync debug mode left on", True),
    Rule("DBG203", "debug-environment-variable", "debug environment variable set in code", True),
    Rule("DBG204", "jax-debug-config", "JAX jit disabled or NaN/Inf debugging left on", True),
    Rule("DBG205", "jax-debug-breakpoint", "`jax.debug.breakpoint()`", True, "T100"),
    Rule("DBG206", "jax-debug-print", "`jax.debug.print()`", True),
    Rule("DBG900", "syntax-error", "file cannot be parsed", False),
    Rule("DBG901", "undecodable-file", "file is binary or not in its declared encoding", False),
    Rule("DBG902", "unreadable-file", "file cannot be read", False),
)

RULES_BY_CODE: dict[str, Rule] = {rule.code: rule for rule in RULES}
ERROR_CODES = frozenset({"DBG900", "DBG901", "DBG902"})

# Modules whose only purpose is debugging: importing them, or calling anything in them, is a
# leftover.
DEBUGGER_MODULES: frozenset[str] = frozenset(
    {
        "pdb",
        "ipdb",
        "pudb",
        "bpdb",
        "pdbr",
        "wdb",
        "rpdb",
        "remote_pdb",
        "web_pdb",
        "q",
        "pydevd",
        "pydevd_pycharm",
        "debugpy",
        "ptvsd",
        "celery.contrib.rdb",
        "IPython.core.debugger",
        "IPython.terminal.debugger",
        "IPython.terminal.embed",
        "IPython.frontend.terminal.embed",
    }
)

# Debugger entry points that live in general-purpose modules (importing the module is fine).
DEBUGGER_CALLABLES: frozenset[str] = frozenset(
    {
        "IPython.embed",
        "IPython.embed_kernel",
        "IPython.start_ipython",
        "IPython.start_kernel",
        "code.interact",
        "pytest.set_trace",
        "_pytest.debugging.pytestPDB.set_trace",
    }
)

# The builtin breakpoint and the hooks it calls; importing one by name is a debugger import.
BREAKPOINT_CALLABLES: frozenset[str] = frozenset(
    {"builtins.breakpoint", "sys.breakpointhook", "sys.__breakpointhook__"}
)
DYNAMIC_IMPORTERS: frozenset[str] = frozenset({"builtins.__import__", "importlib.import_module"})
PRINT_CALLABLES: frozenset[str] = frozenset({"builtins.print"})
PPRINT_CALLABLES: frozenset[str] = frozenset({"pprint.pprint", "pprint.pp"})

ANOMALY_SETTERS: frozenset[str] = frozenset(
    {"torch.autograd.set_detect_anomaly", "torch.autograd.anomaly_mode.set_detect_anomaly"}
)
ANOMALY_CONTEXTS: frozenset[str] = frozenset(
    {"torch.autograd.detect_anomaly", "torch.autograd.anomaly_mode.detect_anomaly"}
)
SYNC_DEBUG_SETTERS: frozenset[str] = frozenset({"torch.cuda.set_sync_debug_mode"})
DEBUG_ENV_VARS: frozenset[str] = frozenset(
    {"CUDA_LAUNCH_BLOCKING", "TORCH_SHOW_CPP_STACKTRACES", "JAX_DISABLE_JIT", "JAX_DEBUG_NANS"}
)
ENVIRON = "os.environ"
PUTENV = "os.putenv"
JAX_CONFIG_UPDATE: frozenset[str] = frozenset(
    {"jax.config.update", "jax.config.config.update", "jax._src.config.config.update"}
)
JAX_DEBUG_FLAGS: frozenset[str] = frozenset({"jax_disable_jit", "jax_debug_nans", "jax_debug_infs"})
JAX_DEBUG_CONTEXTS: frozenset[str] = frozenset(
    {"jax.disable_jit", "jax.debug_nans", "jax.debug_infs"}
)
JAX_BREAKPOINT = "jax.debug.breakpoint"
JAX_PRINT = "jax.debug.print"

# A file that contains none of these words cannot contain a finding (every rule needs one of
# them in the source text, whatever the import form), so it is not analysed.
TRIGGER_WORDS: tuple[str, ...] = (
    "print(",  # `print` alone is mostly prose in docstrings; PRINT_USE catches `print (`
    "pprint",
    "pdb",
    "breakpoint",
    "set_trace",
    "anomaly",
    "Pdb",
    "pudb",
    "wdb",
    "pydevd",
    "debugpy",
    "ptvsd",
    "IPython",
    "interact",
    "rdb",
    "sync_debug",
    "CUDA_LAUNCH_BLOCKING",
    "TORCH_SHOW_CPP_STACKTRACES",
    "JAX_",
    "jax",
    "import q",
    "from q ",
    "'q'",
    '"q"',
)

# ruff's codes that suppress ours, so code annotated for ruff or flake8 keeps working.
NOQA_ALIASES: dict[str, frozenset[str]] = {
    "T100": frozenset({"DBG001", "DBG002", "DBG003", "DBG004", "DBG205"}),
    "T201": frozenset({"DBG101"}),
    "T203": frozenset({"DBG102"}),
}
