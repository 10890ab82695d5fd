"""``[kernel]`` settings against a fake ``/proc/sys/net/mptcp`` (a kernel
older than this machine's cannot be had otherwise), and a fake path
manager where the kernel would not fail on demand."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from mptcpd_py import kernel_settings, sysctl
from mptcpd_py.config import KernelConfig, LimitsConfig
from mptcpd_py.errors import InvalidArgument
from mptcpd_py.kernel_settings import (
    KernelSettingsError,
    apply_kernel_settings,
    restore_kernel_settings,
)
from mptcpd_py.netlink import probe
from mptcpd_py.netlink.types import EndpointFlags, Limits
from mptcpd_py.state import StateStore


class Log:
    def __getattr__(self, level: str) -> Any:
        return lambda *args, **kwargs: None


class FakePM:
    """Limits as a kernel keeps them; ``refuse`` makes SET_LIMITS fail."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.limits = Limits(2, 0)
        self.refuse = refuse

    async def get_limits(self) -> Limits:
        return self.limits

    async def set_limits(self, subflows: int | None = None,
                         add_addr_accepted: int | None = None) -> None:
        if self.refuse:
            raise InvalidArgument(errno.EINVAL, "limit greater than maximum (4)", "set limits")
        assert subflows is not None and add_addr_accepted is not None
        self.limits = Limits(subflows, add_addr_accepted)


def fake_sysctls(monkeypatch: pytest.MonkeyPatch, directory: Path, **values: str) -> Path:
    """A ``net/mptcp`` directory holding just ``values`` (a kernel lacks the rest)."""
    directory.mkdir()
    for name, value in values.items():
        (directory / name).write_text(value + "\n")
    monkeypatch.setattr(sysctl, "MPTCP_SYSCTL_DIR", str(directory))
    return directory


def read(directory: Path, name: str) -> str:
    return (directory / name).read_text().strip()


async def old_kernel_caps(monkeypatch: pytest.MonkeyPatch) -> Any:
    # The flag probe makes a namespace of its own: not what is tested here.
    monkeypatch.setattr(probe, "kept_flags", lambda: EndpointFlags.SIGNAL)
    return await probe.probe_capabilities(FakePM())  # type: ignore[arg-type]


async def test_a_kernel_with_pm_type_only_offers_the_userspace_pm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 5.19-6.14: net.mptcp.pm_type, no path_manager, no available_path_managers.
    mptcp = fake_sysctls(monkeypatch, tmp_path / "mptcp", enabled="1", pm_type="0")
    caps = await old_kernel_caps(monkeypatch)
    assert caps.available_path_managers == ("kernel", "userspace")
    assert caps.path_manager == "kernel"
    store = StateStore(str(tmp_path / "state"))
    cfg = KernelConfig("userspace", True, LimitsConfig())
    await apply_kernel_settings(cfg, caps, FakePM(), store, Log())  # type: ignore[arg-type]
    assert read(mptcp, "pm_type") == "1"
    assert sysctl.active_path_manager() == "userspace"
    await restore_kernel_settings(FakePM(), store, Log())  # type: ignore[arg-type]
    assert read(mptcp, "pm_type") == "0"


async def test_a_kernel_without_pm_type_offers_the_kernel_pm_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_sysctls(monkeypatch, tmp_path / "mptcp", enabled="1")
    caps = await old_kernel_caps(monkeypatch)
    assert caps.available_path_managers == ("kernel",)
    cfg = KernelConfig("userspace", True, LimitsConfig())
    with pytest.raises(KernelSettingsError) as info:
        await apply_kernel_settings(cfg, caps, FakePM(), StateStore(str(tmp_path / "state")),  # type: ignore[arg-type]
                                    Log())
    assert str(info.value) == ("kernel.path_manager: 'userspace' is not available in this "
                               "kernel (available: kernel)")


async def test_a_kernel_without_pm_type_starts_with_the_kernel_pm_it_has(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 5.6-5.18: the in-kernel path manager and no sysctl to name it.
    mptcp = fake_sysctls(monkeypatch, tmp_path / "mptcp", enabled="1")
    caps = await old_kernel_caps(monkeypatch)
    assert caps.path_manager == "kernel"
    store = StateStore(str(tmp_path / "state"))
    cfg = KernelConfig("kernel", True, LimitsConfig())
    await apply_kernel_settings(cfg, caps, FakePM(), store, Log())  # type: ignore[arg-type]
    assert sorted(p.name for p in mptcp.iterdir()) == ["enabled"]  # nothing written
    assert store.state.saved_sysctls == {}


def on_disk(state_dir: Path) -> Any:
    """What a start after a crash would read."""
    return json.loads((state_dir / "state.json").read_text())


async def test_each_original_is_on_disk_before_its_change_and_a_refused_one_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mptcp = fake_sysctls(monkeypatch, tmp_path / "mptcp", enabled="0", path_manager="kernel",
                         available_path_managers="kernel userspace")
    written: list[Any] = []
    real_write = sysctl.write_mptcp_sysctl

    def write(name: str, value: str) -> None:
        """Each write with the originals on disk at that moment; the path
        manager's is refused (as a read-only /proc/sys would)."""
        written.append((name, value, on_disk(tmp_path / "state")["saved_sysctls"]))
        if name == "path_manager":
            raise OSError(errno.EROFS, "Read-only file system")
        real_write(name, value)

    monkeypatch.setattr(kernel_settings, "write_mptcp_sysctl", write)
    monkeypatch.setattr(sysctl, "write_mptcp_sysctl", write)
    caps = await old_kernel_caps(monkeypatch)
    store = StateStore(str(tmp_path / "state"))
    cfg = KernelConfig("userspace", True, LimitsConfig())
    with pytest.raises(KernelSettingsError) as info:
        await apply_kernel_settings(cfg, caps, FakePM(), store, Log())  # type: ignore[arg-type]
    assert str(info.value) == \
        "kernel.path_manager: cannot switch to userspace: Read-only file system"
    assert written[0] == ("enabled", "1", {"enabled": "0"})  # recorded, then changed
    assert written[1] == ("path_manager", "userspace",
                          {"enabled": "0", "path_manager": "kernel"})
    assert read(mptcp, "path_manager") == "kernel"
    assert read(mptcp, "enabled") == "1"
    # The next start (after a crash here) knows what to restore, and only that.
    assert on_disk(tmp_path / "state")["saved_sysctls"] == {"enabled": "0"}
    again = StateStore(str(tmp_path / "state"))
    again.load()
    await restore_kernel_settings(FakePM(), again, Log())  # type: ignore[arg-type]
    assert read(mptcp, "enabled") == "0"
    assert on_disk(tmp_path / "state")["saved_sysctls"] == {}


async def test_limits_are_recorded_before_they_change_and_not_when_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_sysctls(monkeypatch, tmp_path / "mptcp", enabled="1", path_manager="kernel",
                 available_path_managers="kernel userspace")
    caps = await old_kernel_caps(monkeypatch)
    cfg = KernelConfig("kernel", True, LimitsConfig(subflows=4))
    store = StateStore(str(tmp_path / "state"))
    with pytest.raises(KernelSettingsError):
        await apply_kernel_settings(cfg, caps, FakePM(refuse=True), store, Log())  # type: ignore[arg-type]
    assert on_disk(tmp_path / "state")["saved_limits"] is None

    class Watching(FakePM):
        async def set_limits(self, subflows: int | None = None,
                             add_addr_accepted: int | None = None) -> None:
            assert on_disk(tmp_path / "state")["saved_limits"] == \
                {"subflows": 2, "add_addr_accepted": 0}
            await super().set_limits(subflows, add_addr_accepted)

    pm = Watching()
    await apply_kernel_settings(cfg, caps, pm, store, Log())  # type: ignore[arg-type]
    assert pm.limits == Limits(4, 0)
