"""launch.json as VS Code reads it: JSONC, the launch keys the Python Debugger extension knows,
and the variables it substitutes (${workspaceFolder}, ${file}, ${input:...}, ${env:...})."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

ALLOWED_VARIABLES = ("workspaceFolder", "file", "input", "env")
VARIABLE = re.compile(r"\$\{([^}:]+)(?::([^}]*))?\}")

# Launch-request properties the Python Debugger extension accepts (its package.json schema).
KNOWN_LAUNCH_KEYS = frozenset({
    "name", "type", "request", "program", "module", "code", "args", "cwd", "env", "envFile",
    "python", "pythonArgs", "console", "consoleName", "redirectOutput", "justMyCode",
    "subProcess", "stopOnEntry", "showReturnValue", "django", "jinja", "flask", "pyramid",
    "gevent", "sudo", "logToFile", "purpose", "pathMappings", "autoReload", "guiEventLoop",
    "presentation", "preLaunchTask", "postDebugTask", "internalConsoleOptions", "rules",
    "autoStartBrowser", "serverReadyAction", "windows", "linux", "osx", "debugAdapterPath",
    "clientOS", "debugOptions",
})  # fmt: skip


class DapFailure(AssertionError):
    """A configuration did not behave as VS Code would need it to."""


def load_jsonc(path: Path) -> Any:
    """Parses JSON with // and /* */ comments and trailing commas (VS Code's JSONC)."""
    text = path.read_text(encoding="utf-8")
    out, i, in_string = [], 0, False
    while i < len(text):
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\":
                out.append(text[i + 1])
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif text.startswith("//", i):
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
            continue
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
            continue
        else:
            out.append(ch)
        i += 1
    cleaned = re.sub(r",(\s*[}\]])", r"\1", "".join(out))
    return json.loads(cleaned)


def substitute(value: Any, variables: dict[str, str], inputs: dict[str, str]) -> Any:
    """Resolves ${workspaceFolder}, ${file}, ${input:id} and ${env:NAME} in a configuration.

    Raises:
        DapFailure: a variable VS Code would not resolve here, or an unknown input id.
    """
    if isinstance(value, dict):
        return {k: substitute(v, variables, inputs) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, variables, inputs) for v in value]
    if not isinstance(value, str):
        return value

    def resolve(match: re.Match[str]) -> str:
        name, arg = match.group(1), match.group(2)
        if name == "input":
            if arg not in inputs:
                raise DapFailure(f"${{input:{arg}}} has no entry in launch.json's inputs")
            return inputs[arg]
        if name == "env":
            return os.environ.get(arg or "", "")
        if name in variables and arg is None:
            return variables[name]
        raise DapFailure(
            f"variable {match.group(0)} is not one of ${{workspaceFolder}}, ${{file}}, "
            "${input:...}, ${env:...}"
        )

    return VARIABLE.sub(resolve, value)


def input_defaults(launch: dict[str, Any]) -> dict[str, str]:
    """Each input's default, as VS Code pre-fills the prompt."""
    return {item["id"]: str(item.get("default", "")) for item in launch.get("inputs", [])}
