"""pyroute2 message classes for the ``mptcp_pm`` family.

pyroute2 0.9 knows only endpoint and limit commands, types IF_IDX wrongly and
has no event message: these classes cover every command attribute
(TOKEN, LOC_ID, ADDR_REMOTE) and every event attribute of the kernel's
``mptcp_pm.yaml``.
"""

# pyroute2 is untyped; these classes are its declarative message tables.
# mypy: disallow-subclassing-any=False

from __future__ import annotations

from pyroute2.netlink import genlmsg, nla

NLA_F_NESTED = 0x8000

# The constants live in the codec (the daemon must not import pyroute2 for them).
from mptcpd_py.netlink.codec import (  # noqa: E402,F401  (re-exported)
    CMD_ADD_ADDR,
    CMD_ANNOUNCE,
    CMD_DEL_ADDR,
    CMD_FLUSH_ADDRS,
    CMD_GET_ADDR,
    CMD_GET_LIMITS,
    CMD_REMOVE,
    CMD_SET_FLAGS,
    CMD_SET_LIMITS,
    CMD_SUBFLOW_CREATE,
    CMD_SUBFLOW_DESTROY,
    COMMAND_NAMES,
    GROUP_CMDS,
    GROUP_EVENTS,
    MPTCP_PM_VERSION,
)


class mptcp_pm_msg(genlmsg):
    """Requests and replies of the ``mptcp_pm`` commands."""

    prefix = "MPTCP_PM_ATTR_"
    nla_map = (
        ("MPTCP_PM_ATTR_UNSPEC", "none"),
        ("MPTCP_PM_ATTR_ADDR", "pm_addr"),
        ("MPTCP_PM_ATTR_RCV_ADD_ADDRS", "uint32"),
        ("MPTCP_PM_ATTR_SUBFLOWS", "uint32"),
        ("MPTCP_PM_ATTR_TOKEN", "uint32"),
        ("MPTCP_PM_ATTR_LOC_ID", "uint8"),
        ("MPTCP_PM_ATTR_ADDR_REMOTE", "pm_addr"),
    )

    class pm_addr(nla):
        prefix = "MPTCP_PM_ADDR_ATTR_"
        nla_map = (
            ("MPTCP_PM_ADDR_ATTR_UNSPEC", "none"),
            ("MPTCP_PM_ADDR_ATTR_FAMILY", "uint16"),
            ("MPTCP_PM_ADDR_ATTR_ID", "uint8"),
            ("MPTCP_PM_ADDR_ATTR_ADDR4", "ip4addr"),
            ("MPTCP_PM_ADDR_ATTR_ADDR6", "ip6addr"),
            ("MPTCP_PM_ADDR_ATTR_PORT", "uint16"),
            ("MPTCP_PM_ADDR_ATTR_FLAGS", "uint32"),
            ("MPTCP_PM_ADDR_ATTR_IF_IDX", "int32"),
        )


class mptcp_event_msg(genlmsg):
    """Multicast messages of the ``mptcp_pm_events`` group."""

    prefix = "MPTCP_ATTR_"
    nla_map = (
        ("MPTCP_ATTR_UNSPEC", "none"),
        ("MPTCP_ATTR_TOKEN", "uint32"),
        ("MPTCP_ATTR_FAMILY", "uint16"),
        ("MPTCP_ATTR_LOC_ID", "uint8"),
        ("MPTCP_ATTR_REM_ID", "uint8"),
        ("MPTCP_ATTR_SADDR4", "ip4addr"),
        ("MPTCP_ATTR_SADDR6", "ip6addr"),
        ("MPTCP_ATTR_DADDR4", "ip4addr"),
        ("MPTCP_ATTR_DADDR6", "ip6addr"),
        ("MPTCP_ATTR_SPORT", "be16"),
        ("MPTCP_ATTR_DPORT", "be16"),
        ("MPTCP_ATTR_BACKUP", "uint8"),
        ("MPTCP_ATTR_ERROR", "uint8"),
        ("MPTCP_ATTR_FLAGS", "uint16"),
        ("MPTCP_ATTR_TIMEOUT", "uint32"),
        ("MPTCP_ATTR_IF_IDX", "int32"),
        ("MPTCP_ATTR_RESET_REASON", "uint32"),
        ("MPTCP_ATTR_RESET_FLAGS", "uint32"),
        ("MPTCP_ATTR_SERVER_SIDE", "uint8"),
    )
