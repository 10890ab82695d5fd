"""A daemon core in userspace mode with chosen plugins and network and a
path manager that records the kernel commands instead of sending them, so
unit tests can drive UserspacePM with events and see what it asks of the
kernel (bench/hotpath.py builds its core the same way)."""

from __future__ import annotations

import io
import ipaddress
import tempfile
from typing import Any

from mptcpd_py.config import parse_config
from mptcpd_py.core import Core
from mptcpd_py.loader import discover, schemas
from mptcpd_py.logging import configure
from mptcpd_py.netlink.types import IfAddress, Link
from mptcpd_py.userspace import UserspacePM

A = ipaddress.ip_address


class RecordingPM:
    """The kernel's side of the userspace PM commands: each accepted at once
    and recorded as (command, local address, remote address)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    async def announce(self, token: int, address: Any, id: int, **kw: Any) -> None:
        self.calls.append(("announce", str(address), ""))

    async def remove(self, token: int, local_id: int) -> None:
        self.calls.append(("remove", str(local_id), ""))

    async def subflow_create(self, token: int, local: Any, local_id: int, remote: Any,
                             remote_port: int, **kw: Any) -> None:
        self.calls.append(("subflow_create", str(local), str(remote)))

    async def subflow_destroy(self, token: int, local: Any, local_port: int, remote: Any,
                              remote_port: int) -> None:
        self.calls.append(("subflow_destroy", f"{local}:{local_port}",
                           f"{remote}:{remote_port}"))

    async def set_subflow_backup(self, *args: Any, **kw: Any) -> None:
        self.calls.append(("set_backup", "", ""))


def userspace_core(plugins_toml: str, links: list[Link], addresses: list[IfAddress]
                   ) -> tuple[Core, RecordingPM]:
    """``plugins_toml``: the config's ``[daemon] plugins = ...`` line and any
    ``[plugins.NAME]`` sections after it."""
    available, _ = discover([])
    config = parse_config(
        f'[kernel]\npath_manager = "userspace"\n[daemon]\nstate_dir = "{tempfile.mkdtemp()}"\n'
        f'{plugins_toml}\n', "<test>", schemas(available))
    configure("info", "json", io.StringIO())  # the daemon's logging; lines kept off the terminal
    core = Core(config, available)
    core._instantiate_plugins(config, available)
    core.model.devtype_reader = lambda name: ""
    core.model.load(links, addresses, [])
    pm = RecordingPM()
    core.pm = pm  # type: ignore[assignment]
    core.userspace = UserspacePM(core)
    return core, pm
