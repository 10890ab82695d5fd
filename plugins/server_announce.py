"""server_announce: a server announces its other addresses to each client
(userspace path manager).

When a connection accepted by this host is established, every eligible
local address of the connection's family other than the one the client
connected to is announced (ADD_ADDR), optionally with a ``port``; the
client's path manager can then open subflows to them. ``addresses``
limits the announcements to a fixed list; a listed address that is not on
this host at the moment is skipped (logged once until it comes back), not
an error.

An announced port needs an MPTCP listener on it; by default (``port = 0``)
the connection's own port is used, which the server already listens on.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from mptcpd_py.netlink.types import Address
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

    def __init__(self, config: Mapping[str, Any], log: Any) -> None:
        super().__init__(config, log)
        self._listed = [ipaddress.ip_address(a) for a in config["addresses"]]
        self._absent: set[Address] = set()  # listed, not on this host: logged once

    def _present(self, ctx: ConnectionContext) -> list[Address]:
        """The listed addresses this host has now. One it lacks is a policy
        that does not apply for the moment, not an error (announcing it is
        an invalid action, which fails the whole hook)."""
        local = ctx.net.local_addresses
        present = []
        for address in self._listed:
            if address in local:
                present.append(address)
                self._absent.discard(address)
            elif address not in self._absent:
                self._absent.add(address)
                self.log.info("listed address not on this host; not announced until it is",
                              addr=str(address))
        return present

    def _announce(self, ctx: ConnectionContext) -> None:
        conn = ctx.conn
        if not conn.server_side or not conn.established:
            return
        done = {addr for _id, addr, _port in conn.announced}
        if self._listed:
            wanted = self._present(ctx)
        else:
            wanted = [c.address.address for c in ctx.net.eligible]
        for address in wanted:
            if address == conn.local or address.version != conn.local.version or address in done:
                continue
            ctx.announce(address, self.config["port"], reason="server_announce")

    def connection_established(self, ctx: ConnectionContext) -> None:
        self._announce(ctx)

    def network_changed(self, ctx: ConnectionContext) -> None:
        self._announce(ctx)
