"""A separate process that timestamps the kernel's MPTCP events in a namespace.

``python -m bench.recorder NETNS OUT COUNTERS EXTRA_SOURCE``

A process of its own so that the harness's Python work (opening a thousand
connections) never delays a timestamp behind the GIL. It joins the
``mptcp_pm_events`` group with a 32 MiB buffer, prints ``ready``, and on
SIGTERM writes one JSON line per event to OUT: ``[t_ns, event, token,
saddr, sport]`` (CLOCK_MONOTONIC, the clock of ``time.monotonic``).
Live counters for the harness, three u64 in the file COUNTERS: ESTABLISHED
events, SUB_ESTABLISHED events from EXTRA_SOURCE, CLOSED events.
"""

from __future__ import annotations

import ipaddress
import json
import mmap
import signal
import socket
import struct
import sys
import time

from bench.nl import SOL_NETLINK, Netlink, resolve_family
from mptcpd_py.netlink import codec as c
from mptcpd_py.netlink.socket import NETLINK_GENERIC, split_messages

NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33
ESTABLISHED, CLOSED, SUB_ESTABLISHED = 2, 3, 10
COUNTERS = struct.Struct("=QQQ")


def main(argv: list[str]) -> int:
    netns, out_path, counters_path, extra = argv
    extra_packed = ipaddress.ip_address(extra).packed
    nl = Netlink(NETLINK_GENERIC, netns)
    family, groups = resolve_family(nl, "mptcp_pm")
    nl.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    nl.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, groups["mptcp_pm_events"])
    nl.sock.settimeout(0.1)
    with open(counters_path, "r+b") as f:
        counters = mmap.mmap(f.fileno(), COUNTERS.size)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    received: list[tuple[int, bytes]] = []
    established = extra_subflows = closed = overflows = 0
    print("ready", flush=True)
    while not stop:
        try:
            data = nl.sock.recv(1 << 16)
        except TimeoutError:
            continue
        except OSError as exc:  # ENOBUFS: events lost; counted, reported
            overflows += 1
            print(f"recorder: {exc}", file=sys.stderr, flush=True)
            continue
        # As little as possible here (this process shares the CPUs with the
        # daemon): keep the bytes, decode at the end. A multicast datagram
        # holds one event; its command is the byte after the netlink header.
        received.append((time.monotonic_ns(), data))
        cmd = data[16] if len(data) > 16 else 0
        if cmd == ESTABLISHED:
            established += 1
        elif cmd == SUB_ESTABLISHED and extra_packed in data and \
                c.genl_attrs(data)[1].get(c.EV_SADDR4) == extra_packed:
            extra_subflows += 1
        elif cmd == CLOSED:
            closed += 1
        else:
            continue
        counters[:] = COUNTERS.pack(established, extra_subflows, closed)
    with open(out_path, "w") as f:
        f.write(json.dumps({"overflows": overflows}) + "\n")
        for t, data in received:
            for message in split_messages(data):
                if message.type != family:
                    continue
                cmd, attrs = c.genl_attrs(message.data)
                saddr = attrs.get(c.EV_SADDR4) or attrs.get(c.EV_SADDR6) or b""
                address = str(ipaddress.ip_address(saddr)) if saddr else ""
                f.write(json.dumps([t, cmd, c.as_u32(attrs.get(c.EV_TOKEN)), address,
                                    c.as_be16(attrs.get(c.EV_SPORT))]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
