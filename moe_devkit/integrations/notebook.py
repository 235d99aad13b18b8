"""IPython magics: ``%load_ext moe_devkit``, then inspect and profile routers in a notebook.

* ``%moe_inspect model`` attaches a RouterInspector to the model named ``model`` in the
  notebook's namespace (``%moe_inspect --detach model`` removes it; statistics are kept).
* ``%moe_report [model]`` shows the utilization table (HTML) and the routing plots inline
  (the last model inspected when no name is given).
* ``%%moe_profile model`` runs the cell once under torch.profiler and shows the time of each
  routing stage, from the router's ``moe.*`` record_function spans.

The inspector for each model is also bound in the namespace as ``moe_inspector`` (the last
one) and the profile of the last ``%%moe_profile`` cell as ``moe_profile``, so a later cell
can read them. Nothing is imported from torch or matplotlib until a magic runs.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

if TYPE_CHECKING:
    from moe_devkit.diagnostics.latency.profiler import StageTime
    from moe_devkit.inspect.inspector import RouterInspector


@dataclass(frozen=True)
class CellProfile:
    """Routing stage times of one profiled cell.

    Attributes:
        model: the model's name in the namespace.
        time_basis: "device" (CUDA kernel time) or "cpu".
        stages: time per routing stage, inclusive, summed over the MoE layers.
    """

    model: str
    time_basis: str
    stages: tuple[StageTime, ...]

    def to_html(self) -> str:
        """An HTML table: stage, calls, milliseconds, share."""
        rows = "".join(
            f"<tr><td>{html.escape(s.stage)}</td><td>{s.calls:g}</td>"
            f"<td>{s.time * 1e3:.3f}</td><td>{s.share:.1%}</td></tr>"
            for s in self.stages
        )
        caption = f"routing stages of {html.escape(self.model)} ({self.time_basis} time)"
        return (f"<table><caption>{caption}</caption><thead><tr><th>stage</th><th>calls</th>"
                f"<th>ms</th><th>share</th></tr></thead><tbody>{rows}</tbody></table>")  # fmt: skip


@magics_class
class MoEMagics(Magics):  # type: ignore[misc]
    """The ``moe_*`` magics; one inspector per model name."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.inspectors: dict[str, RouterInspector] = {}
        self.last: str | None = None

    @property
    def ipython(self) -> Any:
        return self.shell

    @property
    def user_ns(self) -> dict[str, Any]:
        namespace: dict[str, Any] = self.ipython.user_ns
        return namespace

    def _model(self, name: str) -> Any:
        if not name.isidentifier():
            raise UsageError(f"expected the name of a model variable; got {name!r}")
        if name not in self.user_ns:
            raise UsageError(f"no variable {name!r} in the namespace; define the model first")
        return self.user_ns[name]

    @line_magic  # type: ignore[misc]
    def moe_inspect(self, line: str) -> None:
        """%moe_inspect [--detach] MODEL: attach (or detach) a RouterInspector."""
        words = line.split()
        detach = "--detach" in words
        names = [w for w in words if w != "--detach"]
        if len(names) != 1:
            raise UsageError("usage: %moe_inspect [--detach] MODEL")
        name = names[0]
        if detach:
            self._inspector(name).detach()
            return
        from moe_devkit.inspect.inspector import RouterInspector

        model = self._model(name)
        previous = self.inspectors.get(name)
        if previous is not None:
            previous.detach()
        try:
            inspector = RouterInspector().attach(model)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"%moe_inspect {name}: {exc}") from None
        self.inspectors[name], self.last = inspector, name
        self.user_ns["moe_inspector"] = inspector

    def _inspector(self, name: str) -> RouterInspector:
        if not name:
            if self.last is None:
                raise UsageError("no model inspected yet; run %moe_inspect MODEL first")
            name = self.last
        if name not in self.inspectors:
            raise UsageError(f"{name!r} is not inspected; run %moe_inspect {name} first")
        return self.inspectors[name]

    @line_magic  # type: ignore[misc]
    def moe_report(self, line: str) -> None:
        """%moe_report [MODEL]: utilization table and routing plots, inline."""
        from moe_devkit.inspect.html import _findings_html, _layers_table
        from moe_devkit.inspect.plots import routing_figure_png

        inspector = self._inspector(line.strip())
        if not inspector.layers:
            raise UsageError("no routing recorded yet; run the model after %moe_inspect")
        report = inspector.summary().to_report()
        section = report["sections"]["routing"]
        _show_html(_findings_html(report.get("findings", [])) + _layers_table(section["layers"]))
        _show_png(routing_figure_png(section))

    @cell_magic  # type: ignore[misc]
    def moe_profile(self, line: str, cell: str) -> None:
        """%%moe_profile MODEL: time each routing stage while the cell runs (once)."""
        import torch

        from moe_devkit.diagnostics.latency.profiler import stage_times

        name = line.strip()
        model = self._model(name)
        cuda = any(p.is_cuda for p in getattr(model, "parameters", list)())
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            result = self.ipython.run_cell(cell)
            if cuda:
                torch.cuda.synchronize()
        result.raise_error()
        basis = "device" if cuda else "cpu"
        profile = CellProfile(name, basis, stage_times(prof.key_averages(), 1, basis))
        self.user_ns["moe_profile"] = profile
        if not profile.stages:
            _show_html("<p>No <code>moe.*</code> span ran in this cell: did it call the model?</p>")
        else:
            _show_html(profile.to_html())


def _show_html(text: str) -> None:
    from IPython.display import HTML, display

    display(HTML(text))  # type: ignore[no-untyped-call]


def _show_png(png: bytes) -> None:
    from IPython.display import Image, display

    display(Image(data=png, format="png"))  # type: ignore[no-untyped-call]


def load_ipython_extension(ipython: Any) -> None:
    """Registers the magics (``%load_ext moe_devkit`` calls this)."""
    ipython.register_magics(MoEMagics)
