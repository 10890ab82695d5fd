"""server_announce: a server announces its other addresses to each client
(userspace path manager).

When a connection accepted by this host is established, every eligible
local address of the connection's family other than the one the client
connected to is announced (ADD_ADDR), optionally with a ``port``; the
client's path manager can then open subflows to them. ``addresses``
limits the announcements to a fixed list; a listed address that is not
eligible at the moment (not on this host, its link down, tentative,
excluded by ``[network]``...) is skipped, logged once with the reason
until it is eligible again, not an error. Eligible is also what the
daemon keeps announced: an address whose link goes down is withdrawn
(RM_ADDR) and announced again when it is back.

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


def _why_not(ctx: ConnectionContext, address: Address) -> str:
    for (_index, candidate), reason in ctx.net.ineligible.items():
        if candidate == address:
            return reason
    return "not on this host"


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
        self._skipped: set[Address] = set()  # listed, not eligible: logged once

    def _eligible_listed(self, ctx: ConnectionContext) -> list[Address]:
        """The listed addresses eligible now. Not more: the core withdraws an
        announced address whose link is not running, so announcing one would
        make it flap on every pass. One that is not eligible is a policy that
        does not apply for the moment, not an error (announcing an address
        the host lacks is an invalid action, which fails the whole hook)."""
        eligible = {c.address.address for c in ctx.net.eligible}
        wanted = []
        for address in self._listed:
            if address in eligible:
                wanted.append(address)
                self._skipped.discard(address)
            elif address not in self._skipped:
                self._skipped.add(address)
                self.log.info("listed address not eligible; not announced until it is",
                              addr=str(address), reason=_why_not(ctx, address))
        return wanted

    def _announce(self, ctx: ConnectionContext) -> None:
        conn = ctx.conn
        if not conn.server_side or not conn.established:
            return
        done = {addr for _id, addr, _port in conn.announced}
        if self._listed:
            wanted = self._eligible_listed(ctx)
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
