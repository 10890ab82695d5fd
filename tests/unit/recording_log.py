"""A stand-in for the daemon's structlog logger that records every line, so
unit tests can check what was said and at which level."""

from __future__ import annotations

from typing import Any


class RecordingLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.lines.append((level, event, kw))
