"""Log rendering: journald fields are UPPERCASE, errors stay one line."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import structlog

from mptcpd_py import logging as mlog


def test_journal_renderer_sends_message_priority_and_uppercase_fields() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    renderer = mlog.JournalRenderer.__new__(mlog.JournalRenderer)
    renderer._send = lambda message, **fields: sent.append((message, fields))
    renderer.identifier = "mptcpd-py"
    renderer._names = {}
    with contextlib.suppress(structlog.DropEvent):  # the renderer prints nothing itself
        renderer(None, "info", {"event": "endpoint added", "level": "info",
                                "addr": "192.0.2.1", "endpoint_id": 3, "ifname": "eth0"})
    (message, fields), = sent
    assert message.startswith("endpoint added")
    assert fields["PRIORITY"] == "6" and fields["SYSLOG_IDENTIFIER"] == "mptcpd-py"
    assert (fields["ADDR"], fields["ENDPOINT_ID"], fields["IFNAME"]) == ("192.0.2.1", "3", "eth0")


def test_json_lines_carry_stable_keys_and_no_traceback_below_debug() -> None:
    out = io.StringIO()
    assert mlog.configure("info", "json", out) == "json"
    log = mlog.get_logger()
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        log.error("plugin failed", plugin="x", error=str(exc), exc_info=exc)
    log.debug("hidden")
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "plugin failed" and record["plugin"] == "x"
    assert "exception" not in record and "Traceback" not in line


def test_auto_format_is_json_off_a_tty_and_console_on_one() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True
    assert mlog.choose_format("auto", io.StringIO()) == "json"
    assert mlog.choose_format("auto", Tty()) == "console"


def test_debug_enabled_follows_the_configured_level() -> None:
    """Hot paths skip formatting what only debug lines show: they must
    still show it when the level is debug (and the level may change on reload)."""
    try:
        mlog.configure("info", "json", stream=io.StringIO())
        assert not mlog.debug_enabled(mlog.get_logger(plugin="x"))
        mlog.configure("debug", "json", stream=io.StringIO())
        assert mlog.debug_enabled(mlog.get_logger(plugin="x"))
    finally:
        structlog.reset_defaults()


def test_a_logger_that_cannot_tell_its_level_counts_as_debug() -> None:
    class Recording:
        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

    assert mlog.debug_enabled(Recording())
