"""``mptcpd-py ctl``: talk to a running daemon over its control socket."""

from __future__ import annotations

import argparse
from typing import Any

COMMANDS = ("status", "endpoints", "connections", "plugins", "limits", "reload", "monitor",
            "metrics")


def add_ctl_parser(sub: Any) -> None:
    ctl = sub.add_parser("ctl", help="query or steer a running daemon")
    ctl.add_argument("--socket", metavar="PATH", help="control socket "
                     "(default /run/mptcpd-py/control)")
    ctl.add_argument("--json", action="store_true", help="machine-readable output")
    ctl.add_argument("what", choices=COMMANDS, metavar="|".join(COMMANDS))


def run_ctl(args: argparse.Namespace) -> int:
    print("mptcpd-py ctl: the control socket is not available in this build")
    return 1
