"""``Finding``: one problem a diagnostic found, the unit every report and CLI lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "error"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error")


@dataclass(frozen=True)
class Finding:
    """A diagnostic's verdict on one thing.

    Attributes:
        code: stable kebab-case identifier, e.g. "nonfinite-output", "dead-expert".
        severity: "info", "warning" or "error".
        message: one human sentence that says what and where.
        location: where it happened (a module's qualified name, "layer 3", a source line).
        step: the step (forward/backward count) it was seen at, if any.
        details: JSON-serialisable extra values (counts, thresholds, positions).
    """

    code: str
    severity: Severity
    message: str
    location: str | None = None
    step: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(
                f"severity must be one of {SEVERITIES}; got severity={self.severity!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (the report's ``findings`` entries)."""
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "location": self.location,
            "step": self.step,
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        """Inverse of ``to_dict``."""
        return cls(
            code=data["code"],
            severity=data["severity"],
            message=data["message"],
            location=data.get("location"),
            step=data.get("step"),
            details=dict(data.get("details", {})),
        )
