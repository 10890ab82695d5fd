"""backup_cellular: cellular links carry MPTCP traffic only when nothing else can.

An interface counts as cellular when its name matches one of the
``match`` globs, when ``detect_devtype`` is on and its sysfs uevent says
``DEVTYPE=wwan``, or when ``detect_link_type`` is on and it is a raw-IP
link (ARPHRD_RAWIP, as qmi_wwan / rmnet / mhi modems are).

In-kernel path manager: endpoints on cellular interfaces (whatever plugin
proposed them) get the ``backup`` flag; the kernel sends data over backup
subflows only when no other subflow works, and moves back when one does.
Userspace path manager: every subflow over a cellular interface is marked
backup (MP_PRIO) as soon as it is established.
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
            iface = net.interfaces.get(intent.ifindex)
            if self._cellular(iface) and EndpointFlags.BACKUP not in intent.flags:
                intent = intent.with_flags(intent.flags | EndpointFlags.BACKUP,
                                           "cellular interface: backup")
            out.append(intent)
        return out

    def _subflow_interface(self, ctx: ConnectionContext, subflow: Subflow) -> Interface | None:
        if subflow.ifindex:
            return ctx.net.interfaces.get(subflow.ifindex)
        for addr in ctx.net.addresses:
            if addr.address == subflow.local:
                return ctx.net.interfaces.get(addr.index)
        return None

    def subflow_established(self, ctx: ConnectionContext, subflow: Subflow) -> None:
        if not subflow.backup and self._cellular(self._subflow_interface(ctx, subflow)):
            ctx.set_backup(subflow, True, reason="cellular interface: backup")
