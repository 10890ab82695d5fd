"""backup_cellular: cellular links carry MPTCP traffic only when nothing else can.

An interface counts as cellular when its name matches one of the
``match`` globs, when ``detect_devtype`` is on and its sysfs uevent says
``DEVTYPE=wwan``, or when ``detect_link_type`` is on and it is a raw-IP
link (ARPHRD_RAWIP, as qmi_wwan / rmnet / mhi modems are).

In-kernel path manager: endpoints on cellular interfaces (whatever plugin
proposed them; one proposed without an interface, ifindex 0, by the
interface its address is on) get the ``backup`` flag; the kernel sends
data over backup subflows only when no other subflow works, and moves
back when one does.

Userspace path manager: as soon as a connection has a subflow over a
non-cellular interface, each of its subflows over a cellular interface is
marked backup (MP_PRIO), the initial subflow included: a connection
opened while only the modem was up moves its data to Wi-Fi or Ethernet
when that path arrives and gets its subflow (opened by fullmesh or sspi).

- A connection with no other path keeps its cellular subflows as they
  are: backup would change nothing (a backup subflow carries the data
  when it is all there is) and would cost an MP_PRIO per connection.
- A subflow marked backup stays backup when the non-cellular paths go
  away: the data moves to it at once anyway (both Linux ends send over
  backup subflows when no other is left), and moves back the moment a
  non-cellular subflow returns, with no moment in which cellular carries
  data alongside it. The in-kernel path manager behaves the same (the
  cellular endpoint keeps its backup flag).
- Changing ``match`` (a reload) applies to subflows from then on; a
  subflow already marked backup keeps its flag until it closes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mptcpd_py.config import check_glob
from mptcpd_py.model import Interface, NetworkSnapshot, matches_any
from mptcpd_py.netlink.types import ARPHRD_RAWIP
from mptcpd_py.plugin import ConnectionContext, EndpointFlags, EndpointIntent, Plugin, Subflow
from mptcpd_py.schema import BOOL, STR_LIST, Option, Schema


class BackupCellular(Plugin):
    __doc__ = __doc__
    name = "backup_cellular"
    options = Schema(
        {
            "match": Option(STR_LIST, ["wwan*", "wwp*", "rmnet*", "usb*"],
                            "Interface name globs of cellular links.", item_check=check_glob),
            "detect_devtype": Option(BOOL, True, "Also treat DEVTYPE=wwan (sysfs) as cellular."),
            "detect_link_type": Option(BOOL, True, "Also treat raw-IP links (ARPHRD_RAWIP) "
                                       "as cellular."),
        },
        "Backup flag for cellular interfaces.",
    )

    def __init__(self, config: Mapping[str, Any], log: Any) -> None:
        super().__init__(config, log)
        self._verdicts: dict[Interface, bool] = {}

    def _cellular(self, iface: Interface | None) -> bool:
        if iface is None:
            return False
        known = self._verdicts.get(iface)
        if known is None:
            known = (matches_any(iface.name, self.config["match"]) is not None
                     or (self.config["detect_devtype"] and iface.devtype == "wwan")
                     or bool(self.config["detect_link_type"]
                             and iface.link_type == ARPHRD_RAWIP))
            if len(self._verdicts) > 1024:
                self._verdicts.clear()
            self._verdicts[iface] = known
        return known

    def endpoints(self, net: NetworkSnapshot, proposed: tuple[EndpointIntent, ...]
                  ) -> Iterable[EndpointIntent]:
        out = []
        for proposal in proposed:
            intent = proposal
            iface = self._intent_interface(net, intent)
            if self._cellular(iface) and EndpointFlags.BACKUP not in intent.flags:
                intent = intent.with_flags(intent.flags | EndpointFlags.BACKUP,
                                           "cellular interface: backup")
            out.append(intent)
        return out

    @staticmethod
    def _intent_interface(net: NetworkSnapshot, intent: EndpointIntent) -> Interface | None:
        """The intent's interface; with ifindex 0 (no device given, which the
        core accepts), the one interface holding its address, if only one does."""
        if intent.ifindex:
            return net.interfaces.get(intent.ifindex)
        holders = {a.index for a in net.addresses if a.address == intent.address}
        return net.interfaces.get(holders.pop()) if len(holders) == 1 else None

    def _subflow_interface(self, ctx: ConnectionContext, subflow: Subflow) -> Interface | None:
        if subflow.ifindex:
            return ctx.net.interfaces.get(subflow.ifindex)
        for addr in ctx.net.addresses:
            if addr.address == subflow.local:
                return ctx.net.interfaces.get(addr.index)
        return None

    def _prefer_non_cellular(self, ctx: ConnectionContext) -> None:
        cellular = []
        better_path = False
        for subflow in ctx.conn.subflows:
            iface = self._subflow_interface(ctx, subflow)
            if iface is None or not iface.running:
                continue  # its path is gone: the core closes it
            if not self._cellular(iface):
                better_path = True
            elif not subflow.backup:
                cellular.append(subflow)
        if better_path:
            for subflow in cellular:
                ctx.set_backup(subflow, True, reason="cellular interface: backup")

    def connection_established(self, ctx: ConnectionContext) -> None:
        self._prefer_non_cellular(ctx)

    def subflow_established(self, ctx: ConnectionContext, subflow: Subflow) -> None:
        self._prefer_non_cellular(ctx)

    def network_changed(self, ctx: ConnectionContext) -> None:
        self._prefer_non_cellular(ctx)
