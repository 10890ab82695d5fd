"""``[kernel]`` applied at start: net.mptcp.enabled, the path manager and
limits, each checked against what the kernel accepts. The originals are
kept in the state file (once: a restart after a crash must not take the
daemon's own values for the originals) and restored at exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from mptcpd_py.config import KernelConfig
from mptcpd_py.endpoints import PathManagerAPI
from mptcpd_py.errors import KernelError, MptcpdError
from mptcpd_py.netlink.types import Capabilities
from mptcpd_py.state import Inherited, StateStore
from mptcpd_py.sysctl import (
    active_path_manager,
    read_mptcp_sysctl,
    set_path_manager,
    write_mptcp_sysctl,
)


class KernelSettingsError(MptcpdError):
    """A ``[kernel]`` setting the kernel cannot take."""


@contextlib.contextmanager
def _recorded(store: StateStore, key: str, original: str) -> Iterator[None]:
    """Save ``net.mptcp.KEY``'s original in the state file *before* the
    block changes it: a daemon killed right after the write leaves a record
    the next start keeps (and restores at its exit). An original already
    recorded (a restart after a crash) is the true one and stays. When the
    block (the write) fails, nothing changed: a record made here goes again."""
    saved = store.state.saved_sysctls
    recorded_here = key not in saved
    if recorded_here:
        saved[key] = original
        store.save()
    try:
        yield
    except BaseException:
        if recorded_here:
            del saved[key]
            store.save()
        raise


async def apply_kernel_settings(cfg: KernelConfig, caps: Capabilities, pm: PathManagerAPI,
                                store: StateStore, log: Any) -> list[str]:
    """Apply; returns the warnings worth a log line. Raises
    KernelSettingsError when a setting is impossible here."""
    state = store.state
    warnings: list[str] = []
    if cfg.enable_mptcp and read_mptcp_sysctl("enabled") != "1":
        with _recorded(store, "enabled", read_mptcp_sysctl("enabled") or "0"):
            try:
                write_mptcp_sysctl("enabled", "1")
            except OSError as exc:
                raise KernelSettingsError(
                    f"kernel.enable_mptcp: cannot set net.mptcp.enabled=1: {exc.strerror}"
                ) from None
        log.info("MPTCP enabled", sysctl="net.mptcp.enabled", value="1")
    if not cfg.enable_mptcp and read_mptcp_sysctl("enabled") == "0":
        log.warning("MPTCP is disabled in this network namespace (net.mptcp.enabled = 0) "
                    "and kernel.enable_mptcp = false: endpoints are set up, but no "
                    "connection uses MPTCP until it is enabled", sysctl="net.mptcp.enabled")
    if cfg.path_manager not in caps.available_path_managers:
        raise KernelSettingsError(
            f"kernel.path_manager: {cfg.path_manager!r} is not available in this kernel "
            f"(available: {', '.join(caps.available_path_managers)})"
        )
    current = active_path_manager()
    if current != cfg.path_manager:
        key = "path_manager" if read_mptcp_sysctl("path_manager") is not None else "pm_type"
        with _recorded(store, key, read_mptcp_sysctl(key) or ""):
            try:
                set_path_manager(cfg.path_manager)
            except OSError as exc:
                raise KernelSettingsError(
                    f"kernel.path_manager: cannot switch to {cfg.path_manager}: {exc.strerror}"
                ) from None
        log.info("path manager selected", path_manager=cfg.path_manager, previous=current)
    limits = cfg.limits
    if limits.subflows is not None or limits.add_addr_accepted is not None:
        try:
            before = await pm.get_limits()
            want_sub = before.subflows if limits.subflows is None else limits.subflows
            want_acc = before.add_addr_accepted if limits.add_addr_accepted is None \
                else limits.add_addr_accepted
            if (want_sub, want_acc) != (before.subflows, before.add_addr_accepted):
                recorded_here = state.saved_limits is None
                if recorded_here:
                    state.saved_limits = {"subflows": before.subflows,
                                          "add_addr_accepted": before.add_addr_accepted}
                    store.save()  # before the change, as for the sysctls
                try:
                    await pm.set_limits(subflows=want_sub, add_addr_accepted=want_acc)
                except KernelError:
                    if recorded_here:  # refused: nothing changed, nothing to restore
                        state.saved_limits = None
                        store.save()
                    raise
                log.info("limits set", subflows=want_sub, add_addr_accepted=want_acc,
                         previous=f"{before.subflows}/{before.add_addr_accepted}")
        except KernelError as exc:
            raise KernelSettingsError(f"kernel.limits: {exc}") from None
    store.save()
    return warnings


async def restore_kernel_settings(pm: PathManagerAPI, store: StateStore, log: Any, *,
                                  own_only: bool = False) -> None:
    """Put back what the daemon changed (on_exit = "remove"). ``own_only``:
    only what this process changed (a failed start); the originals a
    previous daemon recorded stay in the state file for the next start."""
    state = store.state
    inherited = store.inherited if own_only else Inherited()
    if state.saved_limits is not None and not inherited.limits:
        try:
            await pm.set_limits(subflows=state.saved_limits["subflows"],
                                add_addr_accepted=state.saved_limits["add_addr_accepted"])
            log.info("limits restored", subflows=state.saved_limits["subflows"],
                     add_addr_accepted=state.saved_limits["add_addr_accepted"])
            state.saved_limits = None
        except KernelError as exc:
            log.error("limits not restored", error=str(exc))
    for key, value in list(state.saved_sysctls.items()):
        if key in inherited.sysctls:
            continue
        try:
            write_mptcp_sysctl(key, value)
            log.info("sysctl restored", sysctl=f"net.mptcp.{key}", value=value)
            del state.saved_sysctls[key]
        except OSError as exc:
            log.error("sysctl not restored", sysctl=f"net.mptcp.{key}", error=exc.strerror)
    store.save()
