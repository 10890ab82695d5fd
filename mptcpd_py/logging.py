"""structlog set-up: the journal (structured fields), JSON lines or a console.

Stable keys: ``event`` (what happened), ``ifname``, ``addr``,
``endpoint_id``, ``token``, ``plugin``. In the journal they become
UPPERCASE fields (``IFNAME=eth0``) next to MESSAGE and PRIORITY.
"""

from __future__ import annotations

import importlib
import json
import logging as std_logging
import os
import stat
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def under_journald(stream: TextIO = sys.stderr) -> bool:
    """True when stderr is connected to journald (systemd's JOURNAL_STREAM)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        st = os.fstat(stream.fileno())
        dev, ino = value.split(":", 1)
        return stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def choose_format(requested: str, stream: TextIO = sys.stderr) -> str:
    if requested != "auto":
        return requested
    if under_journald(stream):
        return "journal"
    try:
        if stream.isatty():
            return "console"
    except (AttributeError, ValueError):
        pass
    return "json"


class JournalRenderer:
    """Send each event to journald with structured fields; nothing is printed."""

    def __init__(self, identifier: str = "mptcpd-py") -> None:
        journal = importlib.import_module("systemd.journal")
        self._send = journal.send
        self.identifier = identifier

    def __call__(self, _logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        message = str(event_dict.pop("event", ""))
        level = str(event_dict.pop("level", method))
        fields: dict[str, Any] = {}
        extras = []
        for key, value in event_dict.items():
            if key in ("timestamp",):
                continue
            name = "".join(c if c.isalnum() else "_" for c in key).upper().lstrip("_")
            if not name or name.startswith("SYSLOG_"):
                continue
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            fields[name] = text
            if key not in ("exception",):
                extras.append(f"{key}={text}")
        full = message + (" " + " ".join(extras) if extras else "")
        if "exception" in event_dict:
            full += "\n" + str(event_dict["exception"])
        self._send(
            full,
            PRIORITY=str(_SYSLOG_PRIORITY.get(level, 6)),
            SYSLOG_IDENTIFIER=self.identifier,
            **fields,
        )
        raise structlog.DropEvent


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> str:
    """Configure structlog for the process; returns the format chosen."""
    stream = stream or sys.stderr
    chosen = choose_format(fmt, stream)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if chosen == "journal":
        try:
            processors.append(JournalRenderer())
        except ImportError:
            chosen = "json"
    if chosen != "journal":
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=False))
        if level == "debug":
            processors.append(structlog.processors.format_exc_info)
        else:
            processors.append(_drop_traceback)
        if chosen == "console":
            processors.append(structlog.dev.ConsoleRenderer(colors=stream.isatty()))
        else:
            processors.append(structlog.processors.JSONRenderer(default=str))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, 20)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    std_logging.getLogger("pyroute2").setLevel(std_logging.CRITICAL)
    return chosen


def _drop_traceback(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Outside debug, errors stay one line: no tracebacks."""
    event_dict.pop("exc_info", None)
    event_dict.pop("exception", None)
    return event_dict


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("mptcpd-py").bind(**context)
