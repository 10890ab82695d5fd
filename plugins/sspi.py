"""sspi: a single subflow per network interface (userspace path manager).

For each established connection, one subflow from each eligible interface
(other than the one carrying the initial subflow) to the peer's initial
address, using the interface's first eligible address of the connection's
family. An interface that comes back gets its subflow again, the initial
subflow's interface included; a second subflow over the same interface is
never opened (nor while one is being opened). Connections this host
accepted are left alone: a subflow is the client's to open (use
``server_announce`` on a server).

Differences from the C mptcpd's sspi:

- it never creates a subflow (it announces with id 0, which the kernel
  refuses); this one does;
- it closes any second subflow on an interface that already carries one,
  whoever opened it, on both sides. This one only never opens one: it
  closes nothing. On a server the extra subflows are the client's (its
  path manager, the in-kernel one, never opens a closed one again, so the
  client would lose those paths for the whole connection), and a client's
  duplicates can only come from another plugin, such as ``fullmesh``,
  which would open again what sspi closed, in a loop. Enable sspi alone
  for one subflow per interface.
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
        # Interfaces carrying a subflow now, or one being opened (the
        # interface's first address may change meanwhile): the initial one is
        # among the subflows while it lives, so its interface gets a new one
        # after it died.
        used = {by_address.get(s.local) for s in conn.subflows}
        used.update(by_address.get(local) for local, _remote, _port in conn.pending)
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
