"""server_announce: a server announces its other addresses to each client
(userspace path manager).

When a connection accepted by this host is established, every eligible
local address of the connection's family other than the one the client
connected to is announced (ADD_ADDR), optionally with a ``port``; the
client's path manager can then open subflows to them. ``addresses``
limits the announcements to a fixed list.

An announced port needs an MPTCP listener on it; by default (``port = 0``)
the connection's own port is used, which the server already listens on.
"""

from __future__ import annotations

import ipaddress

from mptcpd_py.plugin import ConnectionContext, Plugin
from mptcpd_py.schema import INT, STR_LIST, Option, Schema


def _check_address(text: str) -> str | None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return f"not an IP address: {text!r}"
    return None


class ServerAnnounce(Plugin):
    __doc__ = __doc__
    name = "server_announce"
    options = Schema(
        {
            "addresses": Option(STR_LIST, [], "Addresses to announce; empty = every eligible "
                                "address.", item_check=_check_address),
            "port": Option(INT, 0, "Port to announce with the addresses (0 = none).",
                           min=0, max=65535),
        },
        "Announce extra addresses to clients.",
    )

    def _announce(self, ctx: ConnectionContext) -> None:
        conn = ctx.conn
        if not conn.server_side or not conn.established:
            return
        done = {addr for _id, addr, _port in conn.announced}
        wanted = [ipaddress.ip_address(a) for a in self.config["addresses"]]
        if not wanted:
            wanted = [c.address.address for c in ctx.net.eligible]
        for address in wanted:
            if address == conn.local or address.version != conn.local.version or address in done:
                continue
            ctx.announce(address, self.config["port"], reason="server_announce")

    def connection_established(self, ctx: ConnectionContext) -> None:
        self._announce(ctx)

    def network_changed(self, ctx: ConnectionContext) -> None:
        self._announce(ctx)
