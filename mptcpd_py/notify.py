"""sd_notify: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

The protocol itself (one datagram to $NOTIFY_SOCKET) on a socket kept
open: state changes (READY, RELOADING, STOPPING) wait up to a second for
room in the receiver's queue; STATUS and WATCHDOG never block, so a slow
reader cannot stall the event loop (they are dropped instead, and STATUS
is sent only when it changed, at most twice a second). Without
NOTIFY_SOCKET (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time


class _Channel:
    """The notify socket, opened once and kept (one socket, not one a call)."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.address = ""

    def get(self) -> tuple[socket.socket, str] | None:
        path = os.environ.get("NOTIFY_SOCKET", "")
        if not path:
            return None
        if path.startswith("@"):
            path = "\0" + path[1:]
        if self.sock is None or self.address != path:
            if self.sock is not None:
                self.sock.close()
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.address = path
        return self.sock, path


_channel = _Channel()


def notify(*fields: str, block: bool = True) -> bool:
    target = _channel.get()
    if target is None:
        return False
    sock, path = target
    data = "\n".join(fields).encode()
    try:
        # A Python socket with a timeout waits even with MSG_DONTWAIT: switch modes.
        sock.settimeout(1.0 if block else 0.0)
        sock.sendto(data, path)
        return True
    except OSError:
        return False


class StatusLine:
    """STATUS=... only when it changed, at most every ``interval`` seconds."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.last_text = ""
        self.last_sent = 0.0

    def update(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if text == self.last_text and not force:
            return
        if not force and now - self.last_sent < self.interval:
            return  # the next pass (or the heartbeat) sends the latest text
        if notify(f"STATUS={text}", block=False):
            self.last_text, self.last_sent = text, now


def monotonic_usec() -> str:
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def watchdog_interval() -> float:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), 0 when off."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 1_000_000 / 2
