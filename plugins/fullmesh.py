"""fullmesh: a subflow between every local and every peer address.

In-kernel path manager: subflow endpoints get the ``fullmesh`` flag, so
the kernel opens a subflow from each of them to each address the peer
announced (signal endpoints are left alone: the kernel refuses both).

Userspace path manager: for each established connection, a subflow from
every eligible local address to every known peer address (the initial one
and those announced) of the same family, up to ``max_subflows`` per
connection (the initial one and those being opened included); a path that
comes back (its address eligible again) gets its subflows again, the
initial subflow's path included. Connections this host accepted are left
alone: a subflow is the client's to open (a join toward the client's
ephemeral port is refused); a server announces its addresses instead
(``server_announce``).
"""

from __future__ import annotations

from collections.abc import Iterable

from mptcpd_py.model import NetworkSnapshot
from mptcpd_py.plugin import (
    ConnectionContext,
    EndpointFlags,
    EndpointIntent,
    Plugin,
    RemoteAddress,
    Subflow,
)
from mptcpd_py.schema import INT, Option, Schema


class Fullmesh(Plugin):
    __doc__ = __doc__
    name = "fullmesh"
    options = Schema(
        {"max_subflows": Option(INT, 8, "Subflows per connection (userspace PM), the initial "
                                "one included.", min=1, max=64)},
        "Full mesh of subflows.",
    )

    def endpoints(self, net: NetworkSnapshot, proposed: tuple[EndpointIntent, ...]
                  ) -> Iterable[EndpointIntent]:
        out = []
        for proposal in proposed:
            intent = proposal
            if EndpointFlags.SUBFLOW in intent.flags and EndpointFlags.SIGNAL not in intent.flags \
                    and EndpointFlags.FULLMESH not in intent.flags:
                intent = intent.with_flags(intent.flags | EndpointFlags.FULLMESH, "fullmesh")
            out.append(intent)
        return out

    def _mesh(self, ctx: ConnectionContext) -> None:
        conn = ctx.conn
        if not conn.established or conn.server_side:
            return
        remotes = list(conn.remotes) or [RemoteAddress(0, conn.remote, conn.remote_port)]
        # Subflows being opened count too: the peer's ADD_ADDR may come
        # before the join asked for on establishment is up.
        count = (len(conn.subflows) or 1) + len(conn.pending)
        budget = self.config["max_subflows"] - count
        for cand in ctx.net.eligible:
            local = cand.address.address
            for remote in remotes:
                if budget <= 0:
                    return
                if local.version != remote.address.version:
                    continue
                port = remote.port or conn.remote_port
                if conn.has_subflow(local, remote.address, port) or \
                        (local, remote.address, port) in conn.pending:  # the initial one too
                    continue
                ctx.create_subflow(local, remote.address, port,
                                   reason=f"fullmesh {local} -> {remote.address}")
                budget -= 1

    def connection_established(self, ctx: ConnectionContext) -> None:
        self._mesh(ctx)

    def address_announced(self, ctx: ConnectionContext, remote: RemoteAddress) -> None:
        self._mesh(ctx)

    def network_changed(self, ctx: ConnectionContext) -> None:
        self._mesh(ctx)

    def subflow_closed(self, ctx: ConnectionContext, subflow: Subflow) -> None:
        # Only re-mesh when the path is still usable; a dead path comes back
        # through network_changed once its address is eligible again.
        if ctx.net.candidate(subflow.local) is not None:
            self._mesh(ctx)
