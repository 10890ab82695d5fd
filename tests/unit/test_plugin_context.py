"""A userspace-PM hook records actions through its context; a wrong type
fails at once, inside the hook, where the core contains it and names the
plugin (later it would crash the core's own validation)."""

from __future__ import annotations

import ipaddress

import pytest

from mptcpd_py.model import NetworkSnapshot
from mptcpd_py.plugin import Connection, ConnectionContext, Subflow

A = ipaddress.ip_address


@pytest.fixture
def ctx() -> ConnectionContext:
    conn = Connection(token=7, local=A("192.0.2.1"), local_port=40000,
                      remote=A("192.0.2.2"), remote_port=443)
    return ConnectionContext(conn, NetworkSnapshot(), plugin="t")


def test_well_typed_actions_are_recorded_with_the_connection_defaults(
        ctx: ConnectionContext) -> None:
    ctx.announce("198.51.100.1", 8080)
    ctx.create_subflow("198.51.100.1", backup=True, reason="second path")
    kinds = [(a.kind, str(a.local), a.local_port, a.remote_port, a.backup) for a in ctx.actions]
    assert kinds == [("announce", "198.51.100.1", 8080, 0, False),
                     ("create_subflow", "198.51.100.1", 0, 443, True)]


@pytest.mark.parametrize(("record", "message"), [
    (lambda c: c.announce("198.51.100.1", "x"), "local_port must be a port number 0..65535"),
    (lambda c: c.announce("198.51.100.1", 70000), "local_port must be a port number"),
    (lambda c: c.create_subflow("198.51.100.1", "192.0.2.2", -1), "remote_port must be"),
    (lambda c: c.create_subflow("198.51.100.1", backup="yes"), "backup must be True or False"),
    (lambda c: c.set_backup(Subflow(A("192.0.2.1"), 1, A("192.0.2.2"), 2), backup=1),
     "backup must be True or False"),
    (lambda c: c.announce("198.51.100.1", reason=3), "reason must be a string"),
])
def test_a_wrong_type_fails_inside_the_hook(ctx: ConnectionContext, record, message) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        record(ctx)
    assert ctx.actions == []
