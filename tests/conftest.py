"""Shared fixtures. Integration tests run against the real kernel inside
network namespaces made here; the host namespace is never changed."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from mptcpd_py.lab import Lab, TwoPaths, cleanup_stale_namespaces


def _namespaces_unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2"
    if not os.path.exists("/proc/sys/net/mptcp"):
        return "kernel without MPTCP"
    return ""


@pytest.fixture(scope="session", autouse=True)
def _remove_stale_namespaces() -> None:
    """Session, autouse: delete lab namespaces left by a crashed earlier run."""
    if os.geteuid() == 0:
        cleanup_stale_namespaces()


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """lab: a namespace laboratory; function scope; every namespace it made
    (and every process started in one) is removed at teardown, also on failure.
    Skips the test where namespaces cannot be made."""
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab(request.node.name[:12]) as made:
        yield made


@pytest.fixture
def ns(lab: Lab) -> str:
    """ns: the name of one fresh namespace with lo up; depends on ``lab``."""
    return lab.netns("t").name


@pytest.fixture
def two_paths(lab: Lab) -> TwoPaths:
    """two_paths: client + server namespaces joined by two addressed links
    (see :class:`mptcpd_py.lab.TwoPaths`); depends on ``lab``."""
    return TwoPaths(lab)


@pytest.fixture
def daemons(tmp_path):  # type: ignore[no-untyped-def]
    """daemons: factory of DaemonProcess(ns, config) with a work dir under
    tmp_path; function scope; every daemon still running is killed at teardown."""
    from mptcpd_py.lab import DaemonProcess

    made: list[DaemonProcess] = []

    def make(ns, config_text="", name="d", **kwargs):  # type: ignore[no-untyped-def]
        proc = DaemonProcess(ns, str(tmp_path / name), config_text, **kwargs)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill()
        proc.close()
