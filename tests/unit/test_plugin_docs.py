"""docs/plugins.md is the plugin API's contract: every call signature it
shows (context actions, snapshot and connection helpers, EndpointIntent)
and every hook in its table must be what the code accepts, so the two
cannot drift apart again (create_subflow's ``backup`` was keyword-only
while the docs pass it positionally)."""

from __future__ import annotations

import ast
import inspect
import ipaddress
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from mptcpd_py.model import Candidate, Interface, NetworkSnapshot
from mptcpd_py.netlink.types import EndpointFlags, IfAddress
from mptcpd_py.plugin import (
    HOOKS,
    Connection,
    ConnectionContext,
    EndpointIntent,
    RemoteAddress,
    Subflow,
)

DOC = (Path(__file__).resolve().parents[2] / "docs" / "plugins.md").read_text()
A = ipaddress.ip_address

# What each documented name is in the code ("ctx." and "intent." are how the docs
# write an instance of ConnectionContext and EndpointIntent).
DOCUMENTED: dict[str, Any] = {
    "ctx.announce": ConnectionContext.announce,
    "ctx.remove": ConnectionContext.remove,
    "ctx.create_subflow": ConnectionContext.create_subflow,
    "ctx.destroy_subflow": ConnectionContext.destroy_subflow,
    "ctx.set_backup": ConnectionContext.set_backup,
    "EndpointIntent": EndpointIntent,
    "EndpointIntent.for_candidate": EndpointIntent.for_candidate,
    "intent.with_flags": EndpointIntent.with_flags,
    "gateway": NetworkSnapshot.gateway,
    "has_default_route": NetworkSnapshot.has_default_route,
    "candidate": NetworkSnapshot.candidate,
    "interface": NetworkSnapshot.interface,
    "has_subflow": Connection.has_subflow,
}
SIGNATURE = re.compile(r"`((?:ctx\.|intent\.|EndpointIntent\.)?\w+)\(([^`]*)\)`")


def documented_signatures() -> list[tuple[str, str]]:
    found = [(name, params) for name, params in SIGNATURE.findall(DOC) if name in DOCUMENTED]
    assert {name for name, _ in found} == set(DOCUMENTED), "a documented call went missing"
    return found


def parsed(params: str) -> list[tuple[str, Any]]:
    """(name, default or inspect.Parameter.empty) of a documented parameter list."""
    fn = ast.parse(f"def f({params}): pass").body[0]
    assert isinstance(fn, ast.FunctionDef)
    args = fn.args
    defaults = [inspect.Parameter.empty] * (len(args.args) - len(args.defaults)) + [
        ast.literal_eval(d) for d in args.defaults]
    return [(a.arg, d) for a, d in zip(args.args, defaults, strict=True)]


@pytest.mark.parametrize(("name", "params"), documented_signatures())
def test_each_documented_signature_is_what_the_code_takes(name: str, params: str) -> None:
    """The documented parameters come first, in order, each positional (as
    the docs may call them) with the documented default; what the code
    adds after them is optional."""
    code = list(inspect.signature(DOCUMENTED[name]).parameters.values())
    if code and code[0].name in ("self", "cls"):
        code = code[1:]
    documented = parsed(params)
    head = code[:len(documented)]
    assert [p.name for p in head] == [doc for doc, _ in documented]
    for param, (_, default) in zip(head, documented, strict=True):
        assert param.kind is param.POSITIONAL_OR_KEYWORD, f"{param.name} is {param.kind}"
        if default is not inspect.Parameter.empty:
            assert param.default == default, param.name
    assert [p.name for p in code[len(documented):] if p.default is p.empty] == []


def test_the_hook_table_is_the_hook_specification() -> None:
    table = re.findall(r"^\| `(\w+)\(self, ([^)]*)\)` \| (\w+) \|", DOC, re.MULTILINE)
    assert {hook: (tuple(params.split(", ")), pm) for hook, params, pm in table} == {
        hook: (spec.params, spec.path_manager) for hook, spec in HOOKS.items()}


def context() -> ConnectionContext:
    conn = Connection(token=7, local=A("192.0.2.1"), local_port=40000,
                      remote=A("192.0.2.2"), remote_port=443)
    return ConnectionContext(conn, NetworkSnapshot(), plugin="t")


def test_the_actions_called_positionally_as_documented_are_recorded() -> None:
    ctx = context()
    subflow = Subflow(A("192.0.2.1"), 40000, A("192.0.2.2"), 443, local_id=0, remote_id=0,
                      backup=False, ifindex=2)
    ctx.announce("198.51.100.1", 0)
    ctx.remove("198.51.100.1")
    ctx.create_subflow("198.51.100.1", None, None, True)
    ctx.create_subflow("198.51.100.1", RemoteAddress(1, A("203.0.113.5"), 8443))
    ctx.destroy_subflow(subflow)
    ctx.set_backup(subflow, True)
    assert [(a.kind, str(a.local), str(a.remote), a.remote_port, a.backup)
            for a in ctx.actions] == [
        ("announce", "198.51.100.1", "None", 0, False),
        ("remove", "198.51.100.1", "None", 0, False),
        ("create_subflow", "198.51.100.1", "192.0.2.2", 443, True),
        ("create_subflow", "198.51.100.1", "203.0.113.5", 8443, False),
        ("destroy_subflow", "192.0.2.1", "192.0.2.2", 443, False),
        ("set_backup", "192.0.2.1", "192.0.2.2", 443, True),
    ]


def test_an_endpoint_intent_built_positionally_as_documented_keeps_its_reason() -> None:
    intent = EndpointIntent(A("192.0.2.1"), 2, EndpointFlags.SUBFLOW, 0, (1,), "why")
    assert (intent.reason, intent.plugin) == ("why", "")
    assert intent.with_flags(EndpointFlags.BACKUP, "more").reason == "why; more"


def test_gateway_is_none_for_a_default_route_without_one_but_has_default_route_says_it(
        ) -> None:
    """`default dev ppp0`: the snapshot keeps it under the negated family."""
    eth0 = Interface(index=2, name="eth0", up=True, running=True)
    ppp0 = Interface(index=3, name="ppp0", up=True, running=True)
    net = NetworkSnapshot(
        interfaces={2: eth0, 3: ppp0},
        addresses=(IfAddress(index=2, address=A("192.0.2.1"), prefixlen=24),),
        eligible=(Candidate(IfAddress(index=2, address=A("192.0.2.1"), prefixlen=24), eth0, 0),),
        gateways={(2, socket.AF_INET): A("192.0.2.254"),
                  (3, -socket.AF_INET): A("0.0.0.0")})
    assert (net.gateway(2, socket.AF_INET), net.has_default_route(2, socket.AF_INET)) == (
        A("192.0.2.254"), True)
    assert (net.gateway(3, socket.AF_INET), net.has_default_route(3, socket.AF_INET)) == (
        None, True)
    assert (net.gateway(2, socket.AF_INET6), net.has_default_route(2, socket.AF_INET6)) == (
        None, False)
    assert net.interface("ppp0") is ppp0
    candidate = net.candidate(A("192.0.2.1"))
    assert candidate is not None
    assert EndpointIntent.for_candidate(candidate, EndpointFlags.SUBFLOW, "why").ifindex == 2
