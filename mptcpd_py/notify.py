"""sd_notify: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

systemd-python's ``daemon.notify`` when it is installed; otherwise the
protocol itself (one datagram to $NOTIFY_SOCKET). Without NOTIFY_SOCKET
(not under systemd) every call is a no-op.
"""

from __future__ import annotations

import importlib
import os
import socket
import time
from typing import Any

_sd_daemon: Any
try:
    _sd_daemon = importlib.import_module("systemd.daemon")
except ImportError:  # pragma: no cover
    _sd_daemon = None


def notify(*fields: str) -> bool:
    message = "\n".join(fields)
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    if _sd_daemon is not None:
        return bool(_sd_daemon.notify(message))
    return _notify_raw(message)


def _notify_raw(message: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


def monotonic_usec() -> str:
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def watchdog_interval() -> float:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), 0 when off."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 1_000_000 / 2
