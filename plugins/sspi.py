"""sspi: a single subflow per network interface (userspace path manager).

For each established connection, one subflow from each eligible interface
(other than the one carrying the initial subflow) to the peer's initial
address, using the interface's first eligible address of the connection's
family. An interface that comes back gets its subflow again, the initial
subflow's interface included; a second subflow over the same interface is
never opened. Connections this host accepted are left alone: a subflow is
the client's to open (use ``server_announce`` on a server).

(The C mptcpd's sspi never creates a subflow: it announces with id 0,
which the kernel refuses. This one does.)
"""

from __future__ import annotations

from mptcpd_py.plugin import ConnectionContext, Plugin, Subflow


class SingleSubflowPerInterface(Plugin):
    __doc__ = __doc__
    name = "sspi"

    def _ensure(self, ctx: ConnectionContext) -> None:
        conn = ctx.conn
        if not conn.established or conn.server_side:
            return
        by_address = {a.address: a.index for a in ctx.net.addresses}
        # Interfaces carrying a subflow now: the initial one is among the
        # subflows while it lives, so its interface gets a new one after it died.
        used = {by_address.get(s.local) for s in conn.subflows}
        for cand in ctx.net.eligible:
            index = cand.interface.index
            local = cand.address.address
            if index in used or local.version != conn.remote.version:
                continue
            used.add(index)
            ctx.create_subflow(local, reason=f"sspi: one subflow on {cand.interface.name}")

    def connection_established(self, ctx: ConnectionContext) -> None:
        self._ensure(ctx)

    def network_changed(self, ctx: ConnectionContext) -> None:
        self._ensure(ctx)

    def subflow_closed(self, ctx: ConnectionContext, subflow: Subflow) -> None:
        if ctx.net.candidate(subflow.local) is not None:
            self._ensure(ctx)
