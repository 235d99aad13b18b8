"""A headless VS Code: drives ``python -m debugpy.adapter`` over stdio with the Debug Adapter
Protocol, the way VS Code runs a launch.json configuration.

``load_jsonc`` reads launch.json; ``substitute`` resolves its variables; ``run_config`` sends
initialize, launch, setBreakpoints, configurationDone, waits for ``stopped``, reads a variable
through stackTrace/scopes/variables, continues, and waits for ``exited`` and ``terminated``.
Anything that goes wrong (an error response, the debuggee exiting before the breakpoint, no
event within the deadline) raises ``DapFailure`` with what was expected, what came, and the
tail of the debuggee's output. Processes are always killed on the way out.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
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


@dataclass
class Stop:
    """Where the debuggee stopped and the variable read there."""

    path: str
    line: int
    variable: str
    value: str
    exit_code: int | None = None
    events: list[str] = field(default_factory=list)


class DapSession:
    """One debug adapter process and the debuggee it starts (through runInTerminal)."""

    def __init__(self, deadline: float, log_dir: Path) -> None:
        self.deadline = deadline
        self.log_dir = log_dir
        self.seq = 0
        self.inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[str] = []
        self.debuggees: list[subprocess.Popen[bytes]] = []
        self.output = log_dir / "debuggee.log"
        self.adapter_stderr = (log_dir / "adapter.log").open("wb")
        self.adapter = subprocess.Popen(
            [sys.executable, "-m", "debugpy.adapter"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.adapter_stderr,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    # ----------------------------------------------------------------- wire format

    def _read(self) -> None:
        stream = self.adapter.stdout
        assert stream is not None
        while True:
            headers: dict[str, str] = {}
            while True:
                line = stream.readline()
                if not line:
                    self.inbox.put(None)
                    return
                line = line.strip()
                if not line:
                    break
                key, _, val = line.decode().partition(":")
                headers[key.strip().lower()] = val.strip()
            body = stream.read(int(headers["content-length"]))
            self.inbox.put(json.loads(body))

    def _write(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode()
        stdin = self.adapter.stdin
        assert stdin is not None
        stdin.write(f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        stdin.flush()

    def send(self, command: str, arguments: dict[str, Any] | None = None) -> int:
        self.seq += 1
        self._write({"seq": self.seq, "type": "request", "command": command,
                     "arguments": arguments or {}})  # fmt: skip
        return self.seq

    # ----------------------------------------------------------------- receiving

    def next_message(self, waiting_for: str) -> dict[str, Any]:
        """The next message, answering reverse requests; DapFailure past the deadline."""
        while True:
            left = self.deadline - time.monotonic()
            try:
                message = self.inbox.get(timeout=max(left, 0.01))
            except queue.Empty:
                raise DapFailure(
                    f"timed out waiting for {waiting_for} (hang?){self.context()}"
                ) from None
            if message is None:
                raise DapFailure(f"the debug adapter closed while waiting for {waiting_for}"
                                 f"{self.context()}")  # fmt: skip
            if message["type"] == "request":
                self._reverse_request(message)
                continue
            if message["type"] == "event":
                self.events.append(message["event"])
                if message["event"] == "output":
                    with self.output.open("a") as fh:
                        fh.write(message["body"].get("output", ""))
            return message

    def _reverse_request(self, message: dict[str, Any]) -> None:
        """runInTerminal: start the debuggee as VS Code's integrated terminal would."""
        if message["command"] != "runInTerminal":
            self._write({"seq": 0, "type": "response", "request_seq": message["seq"],
                         "command": message["command"], "success": False,
                         "message": "not supported"})  # fmt: skip
            return
        args = message["arguments"]
        env = dict(os.environ)
        for key, val in (args.get("env") or {}).items():
            if val is None:
                env.pop(key, None)
            else:
                env[key] = val
        proc = subprocess.Popen(
            args["args"], cwd=args.get("cwd") or None, env=env,
            stdout=self.output.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self.debuggees.append(proc)
        self._write({"seq": 0, "type": "response", "request_seq": message["seq"],
                     "command": "runInTerminal", "success": True,
                     "body": {"processId": proc.pid}})  # fmt: skip

    def response(self, seq: int, command: str) -> dict[str, Any]:
        """Waits for the response to request ``seq``; DapFailure if it failed."""
        while True:
            message = self.next_message(f"the response to {command!r}")
            if message["type"] == "response" and message["request_seq"] == seq:
                if not message["success"]:
                    raise DapFailure(f"{command!r} failed: {message.get('message')}"
                                     f"{self.context()}")  # fmt: skip
                body: dict[str, Any] = message.get("body") or {}
                return body
            self.pending.append(message)

    pending: list[dict[str, Any]]

    def event(self, names: tuple[str, ...], waiting_for: str) -> dict[str, Any]:
        """The next event among ``names`` (earlier messages kept aside are looked at first)."""
        while self.pending:
            message = self.pending.pop(0)
            if message["type"] == "event" and message["event"] in names:
                return message
            self._fail_on(message, waiting_for)
        while True:
            message = self.next_message(waiting_for)
            if message["type"] == "event" and message["event"] in names:
                return message
            self._fail_on(message, waiting_for)

    def _fail_on(self, message: dict[str, Any], waiting_for: str) -> None:
        if message["type"] == "response" and not message["success"]:
            raise DapFailure(f"{message['command']!r} failed while waiting for {waiting_for}: "
                             f"{message.get('message')}{self.context()}")  # fmt: skip

    # ----------------------------------------------------------------- diagnostics

    def output_tail(self, chars: int = 1500) -> str:
        text = self.output.read_text(errors="replace") if self.output.exists() else ""
        return text[-chars:]

    def context(self) -> str:
        return (f"\n  events so far: {self.events[-12:]}"
                f"\n  debuggee output (tail):\n{self.output_tail()}")  # fmt: skip

    def close(self) -> None:
        for proc in [*self.debuggees, self.adapter]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.adapter_stderr.close()


def run_config(
    config: dict[str, Any],
    *,
    breakpoint_at: tuple[Path, int],
    variable: str,
    timeout: float,
) -> Stop:
    """Runs one (already substituted) configuration under the adapter, as VS Code does.

    Args:
        config: the launch configuration with its variables resolved.
        breakpoint_at: (file, line) to set a breakpoint on; the debuggee must stop there.
        variable: a local to read at the breakpoint.
        timeout: seconds for the whole session.

    Raises:
        DapFailure: with what went wrong and the debuggee's output.
    """
    path, line = breakpoint_at
    config = {"python": [sys.executable], **config}  # the extension fills in the interpreter
    with tempfile.TemporaryDirectory(prefix="dap-") as tmp:
        session = DapSession(time.monotonic() + timeout, Path(tmp))
        session.pending = []
        try:
            return _drive(session, config, path, line, variable)
        finally:
            session.close()


def _drive(
    session: DapSession, config: dict[str, Any], path: Path, line: int, variable: str
) -> Stop:
    where = f"{path}:{line}"
    init = session.send("initialize", {
        "clientID": "vscode", "clientName": "Visual Studio Code", "adapterID": "debugpy",
        "pathFormat": "path", "linesStartAt1": True, "columnsStartAt1": True,
        "supportsVariableType": True, "supportsRunInTerminalRequest": True, "locale": "en",
    })  # fmt: skip
    session.response(init, "initialize")
    launch = session.send("launch", config)
    session.event(("initialized",), f"the 'initialized' event after launching {config['name']!r}")
    bps = session.send("setBreakpoints", {"source": {"path": str(path)},
                                          "breakpoints": [{"line": line}]})  # fmt: skip
    session.response(bps, "setBreakpoints")
    session.response(session.send("configurationDone"), "configurationDone")
    session.response(launch, "launch")
    stopped = session.event(("stopped", "exited", "terminated"), f"a stop at {where}")
    if stopped["event"] != "stopped":
        code = stopped.get("body", {}).get("exitCode")
        raise DapFailure(f"the debuggee ended (event {stopped['event']!r}, exit code {code}) "
                         f"before stopping at {where}{session.context()}")  # fmt: skip
    thread = stopped["body"]["threadId"]
    frames = session.response(session.send("stackTrace", {"threadId": thread}), "stackTrace")
    top = frames["stackFrames"][0]
    stop_path, stop_line = top.get("source", {}).get("path", ""), top["line"]
    if Path(stop_path).resolve() != path.resolve() or stop_line != line:
        raise DapFailure(f"stopped at {stop_path}:{stop_line} ({stopped['body'].get('reason')}),"
                         f" expected {where}{session.context()}")  # fmt: skip
    value = _read_variable(session, top["id"], variable, where)
    session.response(session.send("continue", {"threadId": thread}), "continue")
    exited = session.event(("exited",), "the 'exited' event after continuing")
    session.event(("terminated",), "the 'terminated' event")
    code = exited["body"]["exitCode"]
    if code != 0:
        raise DapFailure(f"the debuggee exited with code {code} after the breakpoint"
                         f"{session.context()}")  # fmt: skip
    return Stop(str(path), line, variable, value, code, list(session.events))


def _read_variable(session: DapSession, frame_id: int, name: str, where: str) -> str:
    scopes = session.response(session.send("scopes", {"frameId": frame_id}), "scopes")["scopes"]
    for scope in scopes:
        ref = scope["variablesReference"]
        found = session.response(session.send("variables", {"variablesReference": ref}),
                                 "variables")["variables"]  # fmt: skip
        for var in found:
            if var["name"] == name:
                return str(var["value"])
    raise DapFailure(f"no variable {name!r} in the scopes at {where}{session.context()}")
