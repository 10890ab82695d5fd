"""The state file: snapshot + journal, replayed after a crash."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from mptcpd_py.netlink.types import EndpointFlags
from mptcpd_py.state import JOURNAL_LIMIT, OwnedEndpoint, StateStore

A = ipaddress.ip_address


def rec(id: int, addr: str) -> OwnedEndpoint:
    return OwnedEndpoint(id, A(addr), 0, EndpointFlags.SUBFLOW, 2, "addr_adv")


def test_journaled_adds_survive_a_crash_before_the_snapshot(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path))
    store.put_endpoint(rec(1, "192.0.2.1"))
    store.save()
    store.put_endpoint(rec(2, "192.0.2.2"))  # journaled only: then "SIGKILL"
    store.drop_endpoint(rec(1, "192.0.2.1"))
    again = StateStore(str(tmp_path))
    state = again.load()
    assert sorted(e.id for e in state.endpoints.values()) == [2]


def test_a_torn_journal_line_is_ignored(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path))
    store.put_endpoint(rec(3, "198.51.100.3"))
    with open(store.journal_path, "ab") as f:
        f.write(b'{"op":"put","ep":{"id":4,"addr')  # the crash cut it here
    state = StateStore(str(tmp_path)).load()
    assert [e.id for e in state.endpoints.values()] == [3]


def test_snapshot_empties_the_journal_and_a_corrupt_snapshot_is_set_aside(
        tmp_path: Path) -> None:
    store = StateStore(str(tmp_path))
    store.put_endpoint(rec(1, "192.0.2.1"))
    store.flush()
    assert Path(store.journal_path).read_bytes() == b""
    Path(store.path).write_text("{not json")
    fresh = StateStore(str(tmp_path))
    assert fresh.load().endpoints == {}
    assert "unreadable state" in fresh.problem
    assert (tmp_path / "state.json.corrupt").exists()


def test_checkpoint_leaves_a_short_journal_alone_and_folds_a_long_one(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path))
    store.put_endpoint(rec(1, "192.0.2.1"))
    store.checkpoint()  # one journal line: durable as it is, no snapshot
    assert not Path(store.path).exists()
    assert [e.id for e in StateStore(str(tmp_path)).load().endpoints.values()] == [1]
    for i in range(2, JOURNAL_LIMIT + 1):
        store.put_endpoint(rec(i, f"198.51.100.{i}"))
    store.checkpoint()
    assert Path(store.path).exists()
    assert Path(store.journal_path).read_bytes() == b""
    assert len(StateStore(str(tmp_path)).load().endpoints) == JOURNAL_LIMIT
