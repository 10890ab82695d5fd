"""addr_adv: every eligible address becomes an in-kernel MPTCP endpoint.

The flags come from ``[plugins.addr_adv] flags`` or from the first
``[[plugins.addr_adv.interface]]`` rule whose ``match`` glob fits the
interface name. An address that is removed, or whose link goes down, loses
its endpoint; it comes back when the address or link does. Which addresses
are eligible is ``[network]``'s business (loopback, link-local, excluded
interfaces, ``require_default_route``...).

Flags: ``subflow`` (open subflows from this address: a client),
``signal`` (announce it to the peer: a server), ``backup`` (use only when
no other path works), ``fullmesh`` (a subflow to every peer address; not
with signal), ``laminar`` (kernels that keep it; dropped elsewhere).

Rules order the endpoints too: when more than 8 addresses qualify (the
in-kernel path manager's limit) the ones matching earlier rules win, then
earlier ``[network] include`` globs, then lower interface indexes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mptcpd_py.config import ENDPOINT_FLAG_NAMES, check_glob
from mptcpd_py.model import NetworkSnapshot, matches_any
from mptcpd_py.plugin import EndpointFlags, EndpointIntent, Plugin
from mptcpd_py.schema import STR, STR_LIST, TABLE_LIST, Option, Schema


def check_flags(flags: list[str]) -> str | None:
    if "signal" in flags and "fullmesh" in flags:
        return "signal and fullmesh cannot be combined (the kernel refuses it)"
    return None


FLAGS = Option(STR_LIST, ["subflow"], "Endpoint flags: any of signal, subflow, backup, "
               "fullmesh, laminar.", choices=ENDPOINT_FLAG_NAMES, check=check_flags)

RULE = Schema(
    {
        "match": Option(STR, "*", "Interface name glob.", check=check_glob),
        "flags": FLAGS,
    },
    "A per-interface override; the first rule whose glob matches wins.",
)


class AddrAdv(Plugin):
    __doc__ = __doc__
    name = "addr_adv"
    options = Schema(
        {
            "flags": FLAGS,
            "interface": Option(TABLE_LIST, [], "Per-interface rules, first match wins.",
                                table=RULE),
        },
        "Endpoints for eligible addresses.",
    )

    def __init__(self, config: Mapping[str, Any], log: Any) -> None:
        super().__init__(config, log)
        self._default = EndpointFlags.from_names(config["flags"])
        self._rules = [(rule["match"], EndpointFlags.from_names(rule["flags"]))
                       for rule in config["interface"]]

    def _flags_for(self, ifname: str) -> tuple[EndpointFlags, int, str]:
        index = matches_any(ifname, [glob for glob, _ in self._rules])
        if index is None:
            return self._default, len(self._rules), "flags from [plugins.addr_adv]"
        return self._rules[index][1], index, f"interface rule {self._rules[index][0]!r}"

    def endpoints(self, net: NetworkSnapshot, proposed: tuple[EndpointIntent, ...]
                  ) -> Iterable[EndpointIntent]:
        out = list(proposed)
        for cand in net.eligible:
            flags, rank, why = self._flags_for(cand.interface.name)
            out.append(EndpointIntent(cand.address.address, cand.interface.index, flags,
                                      priority=(rank, *cand.priority),
                                      reason=f"eligible address; {why}"))
        return out
