"""The daemon's lifecycle: start, sd_notify, signals, reload, stop.

SIGTERM / SIGINT: stop (endpoints removed and limits restored per
``on_exit``), exit 0. SIGHUP: reload; a burst collapses into one, and a
broken new config is logged while the old one stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import time
from typing import Any

from mptcpd_py import __version__
from mptcpd_py.coexist import peers_in_namespace
from mptcpd_py.config import Config, load_config, read_raw_daemon_section, usable_path
from mptcpd_py.core import Core
from mptcpd_py.errors import ConfigError, FamilyMissing, KernelError, MptcpdError, PermissionDenied
from mptcpd_py.kernel_settings import KernelSettingsError
from mptcpd_py.loader import Available, discover, schemas
from mptcpd_py.logging import configure, get_logger
from mptcpd_py.notify import StatusLine, monotonic_usec, notify, watchdog_interval

EX_OK, EX_SOFTWARE_FAIL, EX_USAGE = 0, 1, 64
EX_UNAVAILABLE, EX_NOPERM, EX_CONFIG = 69, 77, 78
STOP_TIMEOUT = 20.0


class StartupError(MptcpdError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def load_everything(path: str | None) -> tuple[Config, dict[str, Available], list[str]]:
    """Plugins (their dirs come from the raw file), then the validated config."""
    raw = read_raw_daemon_section(path)
    dirs = raw.get("plugin_dirs", ["/etc/mptcpd-py/plugins.d"])
    if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
        dirs = []
    # Not yet validated: never import from a relative directory (the
    # current one, say) only to refuse the config a moment later.
    dirs = [d for d in dirs if usable_path(d)]
    available, problems = discover(dirs)
    config = load_config(path, schemas(available))
    if tuple(config.daemon.plugin_dirs) != tuple(dirs):  # pragma: no cover - defensive
        available, problems = discover(config.daemon.plugin_dirs)
    return config, available, problems


class Daemon:
    def __init__(self, config_path: str | None, *, log_level: str | None = None,
                 log_format: str | None = None, netns: str | None = None) -> None:
        self.config_path = config_path
        self.log_level = log_level
        self.log_format = log_format
        self.netns = netns
        self.log: Any = get_logger()
        self.core: Core | None = None
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._lock_fd: int | None = None
        self._status_line = StatusLine()
        self.started = time.monotonic()

    def _configure_logging(self, config: Config) -> str:
        return configure(self.log_level or config.daemon.log_level,
                         self.log_format or config.daemon.log_format)

    async def run(self) -> int:
        try:
            config, available, problems = load_everything(self.config_path)
        except ConfigError as exc:
            configure(self.log_level or "info", self.log_format or "auto")
            for line in exc.problems:
                get_logger().error("configuration error", error=line)
            return EX_CONFIG
        fmt = self._configure_logging(config)
        self.log = get_logger()
        self.log.info("mptcpd-py starting", version=__version__, config=config.path,
                      log_format=fmt, pid=os.getpid())
        for problem in problems:
            self.log.error("plugin not loaded", error=problem)
        notify("STATUS=starting")
        try:
            self._check_peers()
            self._lock_state_dir(config.daemon.state_dir)
            core = Core(config, available, netns=self.netns, log=self.log)
            self.core = core
            core.watchdog_interval = watchdog_interval()
            core.heartbeat = self._heartbeat
            core.on_status = self._status
            await self._start_core(core)
        except StartupError as exc:
            self.log.error("cannot start", error=str(exc))
            notify(f"STATUS=failed: {exc}")
            await self._close_core()
            return exc.code
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        notify("READY=1", f"STATUS={core.status_line()}")
        self.log.info("ready", endpoints=len(core.reconciler.owned) if core.reconciler else 0,
                      startup_ms=round((time.monotonic() - self.started) * 1000, 1))
        code = EX_OK
        try:
            await self._serve()
        finally:
            notify("STOPPING=1", "STATUS=stopping")
            self.log.info("stopping", on_exit=core.config.daemon.on_exit)
            try:
                await asyncio.wait_for(core.stop(), STOP_TIMEOUT)
            except TimeoutError:
                self.log.error("stop timed out; leaving the rest", timeout=STOP_TIMEOUT)
                core.close()
                code = EX_SOFTWARE_FAIL
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        self.log.info("stopped")
        return code

    async def _start_core(self, core: Core) -> None:
        try:
            await core.start()
        except FamilyMissing as exc:
            raise StartupError(str(exc), EX_UNAVAILABLE) from None
        except PermissionDenied as exc:
            raise StartupError(f"{exc}; run as root or with CAP_NET_ADMIN", EX_NOPERM) from None
        except KernelSettingsError as exc:
            raise StartupError(str(exc), EX_CONFIG) from None
        except KernelError as exc:
            raise StartupError(str(exc), EX_SOFTWARE_FAIL) from None
        except OSError as exc:
            code = EX_NOPERM if exc.errno in (errno.EPERM, errno.EACCES) else EX_SOFTWARE_FAIL
            raise StartupError(f"{exc.strerror or exc}", code) from None

    async def _close_core(self) -> None:
        if self.core is not None:
            self.core.close()

    def _check_peers(self) -> None:
        conflicts, network_manager = peers_in_namespace()
        if conflicts:
            peer = conflicts[0]
            raise StartupError(
                f"another path manager is running in this network namespace: {peer.name} "
                f"(pid {peer.pid}); two would fight over the same endpoints", EX_SOFTWARE_FAIL)
        for peer in network_manager:
            self.log.warning(
                "NetworkManager is running here and may manage MPTCP endpoints "
                "(connection.mptcp-flags); mptcpd-py never touches endpoints it did not "
                "create and stops restoring one that keeps being deleted", pid=peer.pid)

    def _lock_state_dir(self, state_dir: str) -> None:
        try:
            os.makedirs(state_dir, mode=0o755, exist_ok=True)
            fd = os.open(os.path.join(state_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o644)
        except OSError as exc:
            raise StartupError(f"{state_dir}: {exc.strerror}", EX_SOFTWARE_FAIL) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StartupError(
                f"another mptcpd-py (pid {other}) is using state directory {state_dir}",
                EX_SOFTWARE_FAIL) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _status(self, text: str) -> None:
        self._status_line.update(text)

    def _heartbeat(self) -> None:
        notify("WATCHDOG=1", block=False)
        if self.core is not None:
            self._status_line.update(self.core.status_line())

    async def _serve(self) -> None:
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                reload_wait = asyncio.create_task(self._reload.wait())
                await asyncio.wait({stop_wait, reload_wait}, return_when=asyncio.FIRST_COMPLETED)
                if self._stop.is_set():
                    reload_wait.cancel()
                    break
                # A burst of SIGHUPs collapses into this one reload.
                self._reload.clear()
                await self.reload()
        finally:
            stop_wait.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stop_wait

    async def reload(self) -> bool:
        core = self.core
        assert core is not None
        notify("RELOADING=1", monotonic_usec(), "STATUS=reloading")
        self.log.info("reloading", config=self.config_path or "default")
        try:
            config, available, problems = load_everything(self.config_path)
        except ConfigError as exc:
            for line in exc.problems:
                self.log.error("reload refused: configuration error; the old one stays",
                               error=line)
            notify("READY=1", f"STATUS=reload refused (configuration error); {core.status_line()}")
            return False
        for problem in problems:
            self.log.error("plugin not loaded", error=problem)
        self._configure_logging(config)
        self.log = get_logger()
        core.log = self.log
        try:
            await core.reload(config, available)
        except (KernelSettingsError, KernelError) as exc:
            self.log.error("reload partly failed", error=str(exc))
        notify("READY=1", f"STATUS={core.status_line()}")
        self.log.info("reloaded", plugins=",".join(config.daemon.plugins))
        return True
