"""A headless VS Code: drives ``python -m debugpy.adapter`` with the Debug Adapter Protocol,
the way VS Code runs a launch.json configuration.

``run_config`` runs a configuration resolved by launch_json.py and sends what VS Code sends:
initialize (with VS Code's client capabilities), launch, setBreakpoints, setExceptionBreakpoints
with the filters the adapter marks as default (the boxes VS Code ticks in its Breakpoints
view), configurationDone. Subprocesses the adapter reports through ``startDebugging`` are
attached as VS Code attaches them: a session of their own on the adapter's port, with the same
breakpoints and filters. Every ``stopped`` event, in any session, is recorded and continued,
as a user pressing Continue would. With a breakpoint, the debuggee must stop there (a variable
is read through stackTrace/scopes/variables); without one, no stop is expected; either way
every other stop, and an exit code other than 0, fails the run. Anything that goes wrong (an
error response, the debuggee exiting before the breakpoint, no event within the deadline)
raises ``DapFailure`` with what was expected, what came, and the tail of the debuggee's
output. Processes and connections are always closed on the way out.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch_json import DapFailure

__all__ = ["DapFailure", "Run", "StopAt", "run_config"]

# The "initialize" arguments VS Code sends: it can start terminals and child debug sessions.
VSCODE_INITIALIZE = {
    "clientID": "vscode", "clientName": "Visual Studio Code", "adapterID": "debugpy",
    "pathFormat": "path", "linesStartAt1": True, "columnsStartAt1": True,
    "supportsVariableType": True, "supportsVariablePaging": True,
    "supportsRunInTerminalRequest": True, "supportsStartDebuggingRequest": True,
    "supportsProgressReporting": True, "supportsInvalidatedEvent": True,
    "supportsMemoryReferences": True, "supportsArgsCanBeInterpretedByShell": True,
    "locale": "en",
}  # fmt: skip
MAX_STOPS = 40  # stops continued before a run is given up as a stop loop


@dataclass(frozen=True)
class StopAt:
    """One ``stopped`` event: the session it came from, why, and where."""

    session: str
    reason: str
    text: str  # the exception and its value, for an exception stop
    path: str
    line: int

    def __str__(self) -> str:
        why = f"{self.reason} {self.text}" if self.text else self.reason
        return f"{self.session}: {why} at {self.path}:{self.line}"


@dataclass
class Run:
    """A configuration run to its end: the value read at the breakpoint, and what it saw."""

    exit_code: int
    filters: list[str]  # the exception filters sent (the adapter's defaults)
    sessions: list[str]  # the launch session, then each attached subprocess
    value: str | None = None  # the variable read at the breakpoint, if one was set
    events: list[str] = field(default_factory=list)
    output: str = ""


@dataclass
class _Debugging:
    """What the launch session and the subprocess sessions attached to it share."""

    deadline: float
    log_dir: Path
    breakpoints: list[tuple[Path, int]]
    lock: threading.Lock = field(default_factory=threading.Lock)
    filters: list[str] | None = None  # None: the adapter's defaults, as VS Code ticks them
    stops: list[StopAt] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sessions: list[DapSession] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    debuggees: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def output(self) -> Path:
        return self.log_dir / "debuggee.log"

    def log(self, text: str) -> None:
        with self.lock, self.output.open("a") as fh:
            fh.write(text)

    def output_tail(self, chars: int | None = 1500) -> str:
        """The last ``chars`` characters the debuggee wrote (None: all of it)."""
        text = self.output.read_text(errors="replace") if self.output.exists() else ""
        return text[-chars:] if chars else text


class DapSession:
    """One DAP connection: to the adapter's stdio (the launch) or its port (a subprocess)."""

    def __init__(self, debugging: _Debugging, name: str, reader: Any, writer: Any,
                 sock: socket.socket | None = None) -> None:  # fmt: skip
        self.debugging = debugging
        self.name = name
        self.reader, self.writer, self.sock = reader, writer, sock
        self.seq = 0
        self.inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.pending: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.closed = False
        debugging.sessions.append(self)
        threading.Thread(target=self._read, daemon=True).start()

    # ----------------------------------------------------------------- wire format

    def _read(self) -> None:
        try:
            while (message := self._read_one()) is not None:
                self.inbox.put(message)
        except (OSError, ValueError):
            pass
        self.inbox.put(None)

    def _read_one(self) -> dict[str, Any] | None:
        headers: dict[str, str] = {}
        while True:
            line = self.reader.readline()
            if not line:
                return None
            line = line.strip()
            if not line:
                break
            key, _, val = line.decode().partition(":")
            headers[key.strip().lower()] = val.strip()
        message: dict[str, Any] = json.loads(self.reader.read(int(headers["content-length"])))
        return message

    def _write(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode()
        self.writer.write(f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        self.writer.flush()

    def send(self, command: str, arguments: dict[str, Any] | None = None) -> int:
        self.seq += 1
        self._write({"seq": self.seq, "type": "request", "command": command,
                     "arguments": arguments or {}})  # fmt: skip
        return self.seq

    # ----------------------------------------------------------------- receiving

    def next_message(self, waiting_for: str) -> dict[str, Any] | None:
        """The next message, answering reverse requests; None once the connection closed.

        Raises:
            DapFailure: past the deadline.
        """
        while True:
            left = self.debugging.deadline - time.monotonic()
            try:
                message = self.inbox.get(timeout=max(left, 0.01))
            except queue.Empty:
                raise DapFailure(
                    f"timed out waiting for {waiting_for} in {self.name!r} (hang?){self.context()}"
                ) from None
            if message is None:
                self.closed = True
                return None
            if message["type"] == "request":
                self._reverse_request(message)
                continue
            if message["type"] == "event":
                self.events.append(message["event"])
                body = message.get("body") or {}
                if message["event"] == "output" and body.get("category") != "telemetry":
                    self.debugging.log(body.get("output", ""))
            return message

    def _respond(self, request: dict[str, Any], body: dict[str, Any] | None = None) -> None:
        """Answers a reverse request: with ``body``, or as not supported if None."""
        message = {
            "seq": 0,
            "type": "response",
            "request_seq": request["seq"],
            "command": request["command"],
            "success": body is not None,
            "body": body or {},
        }
        if body is None:
            message["message"] = "not supported"
        self._write(message)

    def _reverse_request(self, message: dict[str, Any]) -> None:
        """runInTerminal and startDebugging, as VS Code answers them."""
        if message["command"] == "runInTerminal":
            self._respond(message, {"processId": self._run_in_terminal(message["arguments"])})
        elif message["command"] == "startDebugging":
            self._respond(message, {})
            configuration = message["arguments"]["configuration"]
            thread = threading.Thread(target=_attach_subprocess, daemon=True,
                                      args=(self.debugging, configuration))  # fmt: skip
            self.debugging.threads.append(thread)
            thread.start()
        else:
            self._respond(message)

    def _run_in_terminal(self, args: dict[str, Any]) -> int:
        """Starts the debuggee as VS Code's integrated terminal would; its output is logged."""
        env = dict(os.environ)
        for key, val in (args.get("env") or {}).items():
            if val is None:
                env.pop(key, None)
            else:
                env[key] = val
        proc = subprocess.Popen(
            args["args"], cwd=args.get("cwd") or None, env=env,
            stdout=self.debugging.output.open("ab"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.debugging.debuggees.append(proc)
        return proc.pid

    def _required(self, waiting_for: str) -> dict[str, Any]:
        message = self.next_message(waiting_for)
        if message is None:
            raise DapFailure(f"the debug adapter closed {self.name!r} while waiting for "
                             f"{waiting_for}{self.context()}")  # fmt: skip
        return message

    def response(self, seq: int, command: str) -> dict[str, Any]:
        """Waits for the response to request ``seq``; DapFailure if it failed."""
        while True:
            message = self._required(f"the response to {command!r}")
            if message["type"] == "response" and message["request_seq"] == seq:
                if not message["success"]:
                    raise DapFailure(f"{command!r} failed: {message.get('message')}"
                                     f"{self.context()}")  # fmt: skip
                body: dict[str, Any] = message.get("body") or {}
                return body
            self.pending.append(message)

    def event(self, names: tuple[str, ...], waiting_for: str, *, closed_ok: bool = False
              ) -> dict[str, Any] | None:  # fmt: skip
        """The next event among ``names`` (earlier messages kept aside are looked at first).

        Returns None if the connection closed first and ``closed_ok``; else DapFailure.
        """
        while self.pending:
            message = self.pending.pop(0)
            if message["type"] == "event" and message["event"] in names:
                return message
            self._fail_on(message, waiting_for)
        while True:
            found = self.next_message(waiting_for) if closed_ok else self._required(waiting_for)
            if found is None or (found["type"] == "event" and found["event"] in names):
                return found
            self._fail_on(found, waiting_for)

    def _fail_on(self, message: dict[str, Any], waiting_for: str) -> None:
        if message["type"] == "response" and not message["success"]:
            raise DapFailure(f"{message['command']!r} failed while waiting for {waiting_for}: "
                             f"{message.get('message')}{self.context()}")  # fmt: skip

    # ----------------------------------------------------------------- as VS Code runs it

    def start(self, command: str, arguments: dict[str, Any]) -> None:
        """initialize, launch/attach, breakpoints, default exception filters, configurationDone."""
        capabilities = self.response(self.send("initialize", VSCODE_INITIALIZE), "initialize")
        if self.debugging.filters is None:  # the Breakpoints view's boxes, shared by sessions
            self.debugging.filters = [
                item["filter"]
                for item in capabilities.get("exceptionBreakpointFilters", [])
                if item.get("default")
            ]
        filters = self.debugging.filters
        started = self.send(command, arguments)
        self.event(("initialized",), f"the 'initialized' event after {command!r}")
        for path in dict.fromkeys(path for path, _ in self.debugging.breakpoints):
            lines = [{"line": line} for where, line in self.debugging.breakpoints if where == path]
            seq = self.send("setBreakpoints", {"source": {"path": str(path)}, "breakpoints": lines})
            self.response(seq, "setBreakpoints")
        seq = self.send("setExceptionBreakpoints", {"filters": filters})
        self.response(seq, "setExceptionBreakpoints")
        self.response(self.send("configurationDone"), "configurationDone")
        self.response(started, command)

    def where(self, stopped: dict[str, Any]) -> tuple[StopAt, int]:
        """Where a ``stopped`` event stopped (its top frame) and that frame's id."""
        body = stopped["body"]
        frames = self.response(self.send("stackTrace", {"threadId": body["threadId"]}),
                               "stackTrace")["stackFrames"]  # fmt: skip
        top = frames[0] if frames else {"id": 0, "line": 0}
        text = body.get("text") or ""
        if body.get("reason") == "exception":
            info = self.response(self.send("exceptionInfo", {"threadId": body["threadId"]}),
                                 "exceptionInfo")  # fmt: skip
            text = f"{info.get('exceptionId', '')}({info.get('description', '')})"
        path = str(top.get("source", {}).get("path", ""))
        stop = StopAt(self.name, str(body.get("reason")), text, path, int(top["line"]))
        return stop, int(top["id"])

    def resume(self, stopped: dict[str, Any]) -> None:
        thread = stopped["body"]["threadId"]
        self.response(self.send("continue", {"threadId": thread}), "continue")

    def record_and_continue(self, stopped: dict[str, Any], stop: StopAt | None = None) -> None:
        """An unexpected stop: noted, then continued (as a user pressing Continue)."""
        stop = stop or self.where(stopped)[0]
        with self.debugging.lock:
            self.debugging.stops.append(stop)
            count = len(self.debugging.stops)
        if count > MAX_STOPS:
            raise DapFailure(f"more than {MAX_STOPS} stops; the last: {stop}{self.context()}")
        self.resume(stopped)

    # ----------------------------------------------------------------- diagnostics

    def context(self) -> str:
        return (f"\n  events so far ({self.name}): {self.events[-12:]}"
                f"\n  debuggee output (tail):\n{self.debugging.output_tail()}")  # fmt: skip

    def close(self) -> None:
        """Ends the connection; a socket is shut down first, so its reader thread returns."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        for stream in (self.writer, self.reader):
            with contextlib.suppress(OSError, ValueError):
                stream.close()


def _attach_subprocess(debugging: _Debugging, configuration: dict[str, Any]) -> None:
    """A subprocess's own session, as VS Code opens it on the adapter's port; stops continued."""
    name = str(configuration.get("name", "subprocess"))
    try:
        connect = configuration["connect"]
        sock = socket.create_connection((connect["host"], int(connect["port"])), timeout=30)
        sock.settimeout(None)
        session = DapSession(debugging, name, sock.makefile("rb"), sock.makefile("wb"), sock)
        session.start("attach", configuration)
        while (found := session.event(("stopped", "terminated"), "the subprocess's end",
                                      closed_ok=True)) is not None:  # fmt: skip
            if found["event"] == "terminated":
                return
            session.record_and_continue(found)
    except (DapFailure, OSError, KeyError, ValueError) as exc:
        if not debugging.sessions[0].closed:
            with debugging.lock:
                debugging.errors.append(f"{name}: {exc}")


def run_config(
    config: dict[str, Any],
    *,
    breakpoint_at: tuple[Path, int] | None = None,
    variable: str | None = None,
    timeout: float,
    exception_filters: list[str] | None = None,
) -> Run:
    """Runs one (already substituted) configuration under the adapter, as VS Code does.

    Args:
        config: the launch configuration with its variables resolved.
        breakpoint_at: (file, line) to set a breakpoint on; the debuggee must stop there,
            and nowhere else. None: the run must end without a single stop.
        variable: a local to read at the breakpoint.
        timeout: seconds for the whole session.
        exception_filters: the exception breakpoints ticked; None: the adapter's defaults
            (what VS Code ticks until the user changes them).

    Returns:
        The exit code, the exception filters sent, the sessions and the value read.

    Raises:
        DapFailure: with what went wrong (every unexpected stop) and the debuggee's output.
    """
    config = {"python": [sys.executable], **config}  # the extension fills in the interpreter
    breakpoints = [breakpoint_at] if breakpoint_at else []
    with tempfile.TemporaryDirectory(prefix="dap-") as tmp:
        debugging = _Debugging(time.monotonic() + timeout, Path(tmp), breakpoints)
        debugging.filters = exception_filters
        adapter_log = (Path(tmp) / "adapter.log").open("wb")
        adapter = subprocess.Popen(
            [sys.executable, "-m", "debugpy.adapter"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=adapter_log, start_new_session=True,
        )  # fmt: skip
        session = DapSession(debugging, "launch", adapter.stdout, adapter.stdin)
        try:
            return _drive(session, config, breakpoint_at, variable)
        finally:
            _close(debugging, adapter)
            adapter_log.close()


def _drive(session: DapSession, config: dict[str, Any], breakpoint_at: tuple[Path, int] | None,
           variable: str | None) -> Run:  # fmt: skip
    session.start("launch", config)
    value = None
    if breakpoint_at is not None:
        value = _stop_at_breakpoint(session, breakpoint_at, variable or "")
    exited = session.event(("exited", "stopped"), "the 'exited' event")
    while exited is not None and exited["event"] == "stopped":
        session.record_and_continue(exited)
        exited = session.event(("exited", "stopped"), "the 'exited' event")
    assert exited is not None
    session.event(("terminated",), "the 'terminated' event")
    debugging = session.debugging
    for thread in debugging.threads:
        thread.join(timeout=max(debugging.deadline - time.monotonic(), 0.01))
    code = int(exited["body"]["exitCode"])
    run = Run(code, list(debugging.filters or []), [s.name for s in debugging.sessions], value,
              list(session.events), debugging.output_tail(None))  # fmt: skip
    _check_clean(session, run)
    return run


def _stop_at_breakpoint(session: DapSession, breakpoint_at: tuple[Path, int], variable: str
                        ) -> str:  # fmt: skip
    """Continues past any other stop (each recorded) to the breakpoint; reads ``variable``."""
    path, line = breakpoint_at
    where = f"{path}:{line}"
    while True:
        stopped = session.event(("stopped", "exited", "terminated"), f"a stop at {where}")
        assert stopped is not None
        if stopped["event"] != "stopped":
            code = stopped.get("body", {}).get("exitCode")
            seen = "".join(f"\n  stopped with {stop}" for stop in session.debugging.stops)
            raise DapFailure(f"the debuggee ended (event {stopped['event']!r}, exit code {code}) "
                             f"before stopping at {where}{seen}{session.context()}")  # fmt: skip
        stop, frame = session.where(stopped)
        if Path(stop.path).resolve() == path.resolve() and stop.line == line:
            value = _read_variable(session, frame, variable, where)
            session.resume(stopped)
            return value
        session.record_and_continue(stopped, stop)


def _check_clean(session: DapSession, run: Run) -> None:
    """DapFailure for any stop but the breakpoint, a subprocess session's error, or exit != 0."""
    debugging = session.debugging
    problems = []
    if debugging.stops:
        problems.append(f"stopped {len(debugging.stops)} time(s) where no breakpoint was set "
                        f"(exception filters {debugging.filters}):")  # fmt: skip
        problems += [f"    {stop}" for stop in debugging.stops]
    problems += [f"a subprocess session failed: {error}" for error in debugging.errors]
    if run.exit_code != 0:
        problems.append(f"the debuggee exited with code {run.exit_code}")
    if problems:
        raise DapFailure("\n  ".join(problems) + session.context())


def _close(debugging: _Debugging, adapter: subprocess.Popen[bytes]) -> None:
    """Kills the processes first: their pipes close, so no reader thread holds a stream."""
    for proc in [*debugging.debuggees, adapter]:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for session in debugging.sessions:
        session.close()


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
