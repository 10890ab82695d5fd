"""The daemon's lifecycle: start, sd_notify, signals, reload, stop.

Startup order: config, state_dir lock, control socket (made, not yet
served), netlink, kernel settings, first reconcile (all in the core),
control socket served, metrics listener, READY. SIGTERM / SIGINT: stop (monitor clients
told, endpoints removed and limits restored per ``on_exit``), exit 0.
SIGHUP or ``ctl reload``: reload; a burst collapses into one, and a broken
new config is logged (and returned to ``ctl``) while the old one stays in
force.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from mptcpd_py import __version__, report
from mptcpd_py.coexist import peers_in_namespace
from mptcpd_py.config import (
    DAEMON,
    Config,
    load_config,
    read_raw_daemon_section,
    usable_path,
)
from mptcpd_py.control import (
    CONFIG_ERROR,
    FAILED,
    SOCKET_NAME,
    Command,
    CommandFailed,
    ControlServer,
    Peer,
    Request,
)
from mptcpd_py.core import Core
from mptcpd_py.errors import (
    ConfigError,
    ControlError,
    FamilyMissing,
    KernelError,
    MptcpdError,
    NetlinkError,
    PermissionDenied,
)
from mptcpd_py.kernel_settings import KernelSettingsError
from mptcpd_py.loader import Available, discover_plugins, schemas
from mptcpd_py.logging import configure, get_logger
from mptcpd_py.notify import StatusLine, monotonic_usec, notify, watchdog_interval
from mptcpd_py.schema import check_value

EX_OK, EX_SOFTWARE_FAIL, EX_USAGE = 0, 1, 64
EX_UNAVAILABLE, EX_NOPERM, EX_CONFIG = 69, 77, 78
STOP_TIMEOUT = 20.0


class StartupError(MptcpdError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ReloadOutcome:
    ok: bool
    problems: list[str] = field(default_factory=list)  # configuration errors (refused)
    error: str = ""  # applied, but the kernel refused part of it


def plugin_dirs_of(path: str | None) -> list[str]:
    """The file's plugin_dirs, read from the raw file (the config cannot be
    validated before the plugins' schemas are known). Never raises: a
    broken file gives the usable directories it lists."""
    raw = read_raw_daemon_section(path)
    # Read as the schema will read it (a string is a one-item list), so
    # that the plugins found are those of the config validated below.
    option = DAEMON.options["plugin_dirs"]
    dirs, wrong = check_value(option, raw.get("plugin_dirs", option.default), ())
    if wrong:
        # The config is refused for it below; meanwhile never import from a
        # relative directory (the current one, say), only from usable ones.
        listed = raw["plugin_dirs"] if isinstance(raw["plugin_dirs"], list) else []
        dirs = [d for d in listed if usable_path(d)]
    return list(dirs)


def load_everything(path: str | None) -> tuple[Config, dict[str, Available], list[str]]:
    """Plugins (their dirs come from the raw file), then the validated config."""
    dirs = plugin_dirs_of(path)
    found = discover_plugins(dirs)
    config = load_config(path, schemas(found.available), found.unloaded)
    if tuple(config.daemon.plugin_dirs) != tuple(dirs):  # pragma: no cover - defensive
        found = discover_plugins(config.daemon.plugin_dirs)
    return config, found.available, found.problems


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
        self._reload_lock = asyncio.Lock()
        self._lock_fd: int | None = None
        self._status_line = StatusLine()
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.config_label = config_path or "default"
        self.load_problems: list[str] = []
        self.control: ControlServer | None = None
        self.metrics: Any = None  # mptcpd_py.metrics.MetricsListener while listening
        self.metrics_error = ""

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
        self.config_label = config.path
        self.load_problems = problems
        for problem in problems:
            self.log.error("plugin not loaded", error=problem)
        notify("STATUS=starting")
        core_started = False
        try:
            self._check_peers()
            self._lock_state_dir(config.daemon.state_dir)
            core = Core(config, available, netns=self.netns, log=self.log)
            self.core = core
            self._bind_control(core)  # before the kernel is touched
            core.watchdog_interval = watchdog_interval()
            core.heartbeat = self._heartbeat
            core.on_status = self._status
            await self._start_core(core)
            core_started = True
            await self._serve_control()
            await self._start_metrics(config.metrics.listen)
        except StartupError as exc:
            self.log.error("cannot start", error=str(exc))
            return await self._failed_start(str(exc), exc.code, core_started)
        except Exception as exc:  # a bug; what this start did is taken back all the same
            error = f"internal error: {type(exc).__name__}: {exc}"
            self.log.error("cannot start", error=error, exc_info=exc)
            return await self._failed_start(error, EX_SOFTWARE_FAIL, core_started)
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
            if core.failed.is_set():
                self.log.error("stopping after a fatal error", error=core.failure)
                notify(f"STATUS=failed: {core.failure}")
                code = EX_SOFTWARE_FAIL
        finally:
            notify("STOPPING=1", "STATUS=stopping")
            self.log.info("stopping", on_exit=core.config.daemon.on_exit)
            await self._stop_observability()
            if not await self._stop_core():
                code = EX_SOFTWARE_FAIL
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        self.log.info("stopped")
        return code

    async def _failed_start(self, error: str, code: int, core_started: bool) -> int:
        """Close the control socket and take back what this start changed;
        ``code`` is the exit status."""
        notify(f"STATUS=failed: {error}")
        await self._stop_observability()
        if core_started or (self.core is not None and self.core.kernel_touched):
            # A start that failed part-way takes back what it did itself
            # (endpoints and routes it added, sysctls and limits it changed),
            # even with on_exit = "keep": keep is for an orderly stop, whose
            # endpoints stay right until the next daemon adopts them. After
            # a failed start nobody keeps them up to date and no next daemon
            # may come (exits 69, 77 and 78 are not restarted). What a
            # previous daemon left for this one to adopt stays, recorded in
            # the state file: exit 1 is restarted, and removing it on every
            # attempt would close live subflows each time.
            await self._stop_core(undo=True)
        else:
            await self._close_core()
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
        except (KernelError, NetlinkError) as exc:
            raise StartupError(str(exc), EX_SOFTWARE_FAIL) from None
        except OSError as exc:
            code = EX_NOPERM if exc.errno in (errno.EPERM, errno.EACCES) else EX_SOFTWARE_FAIL
            raise StartupError(f"{exc.strerror or exc}", code) from None

    # ------------------------------------------------------------------ control, metrics

    def _bind_control(self, core: Core) -> None:
        """Make the control socket before the kernel is touched: one that
        cannot be made (a path too long, a control_group without CAP_CHOWN,
        a file in its way) is a setup problem that a restart does not fix,
        so it is exit 78 (not restarted) with nothing to undo, instead of a
        crash loop that adds and removes every endpoint each time. Requests
        wait in its queue until the first reconcile is done."""
        path = os.path.join(core.config.daemon.state_dir, SOCKET_NAME)
        server = ControlServer(path, commands=self._control_commands(), monitor=core.monitor,
                               log=self.log, group=core.config.daemon.control_group)
        try:
            server.bind()
        except ControlError as exc:
            raise StartupError(str(exc), EX_CONFIG) from None
        self.control = server

    async def _serve_control(self) -> None:
        assert self.control is not None
        await self.control.start()

    async def _start_metrics(self, listen: str) -> None:
        """Metrics are optional: a listener that cannot start is logged (and
        shown by ``ctl status``), the path manager runs on."""
        if self.metrics is not None and self.metrics.listen == listen:
            return
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None
        self.metrics_error = ""
        if not listen:
            return
        from mptcpd_py.metrics import MetricsListener  # noqa: PLC0415

        listener = MetricsListener(listen, self._scrape, self.log)
        try:
            await listener.start()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            self.metrics_error = f"{listen}: {reason}"
            self.log.error("metrics listener not started", listen=listen, error=reason)
            return
        self.metrics = listener

    async def _stop_observability(self) -> None:
        if self.control is not None:
            await self.control.close()
            self.control = None
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None

    def info(self) -> report.DaemonInfo:
        core = self.core
        control = self.control
        counters: dict[str, Any] = {}
        if control is not None:
            c = control.counters
            counters = {"datagrams": c.datagrams, "requests": dict(c.requests),
                        "errors": dict(c.errors), "replies_dropped": c.replies_dropped,
                        "unanswerable": c.unanswerable, "send_buffer_full": c.send_buffer_full,
                        "events_sent": c.events_sent, "events_dropped": c.events_dropped}
        listen = core.config.metrics.listen if core is not None else ""
        return report.DaemonInfo(
            version=__version__, pid=os.getpid(), started=self.started_wall,
            config_path=self.config_label,
            control_socket=control.path if control is not None else "",
            control_group=control.group if control is not None else "",
            metrics_listen=listen if self.metrics is not None else "",
            metrics_error=self.metrics_error,
            monitor_clients=control.monitor_clients if control is not None else 0,
            control=counters,
        )

    async def _scrape(self, accept: str = "") -> tuple[bytes, str]:
        from mptcpd_py.metrics import exposition, families  # noqa: PLC0415

        core = self.core
        assert core is not None
        kernel = await report.read_kernel(core)
        return exposition(families(core, self.info(), kernel), accept)

    def _control_commands(self) -> dict[str, Command]:
        def core() -> Core:
            assert self.core is not None
            return self.core

        async def status(_request: Request, _peer: Peer) -> Any:
            kernel = await report.read_kernel(core())
            return report.status_view(core(), self.info(), kernel)

        async def endpoints(_request: Request, _peer: Peer) -> Any:
            kernel = await report.read_kernel(core(), limits=False, subflows=False)
            if kernel.endpoints is None:
                raise CommandFailed(FAILED, kernel.errors.get("endpoints", "no endpoints"))
            return {"endpoints": report.endpoint_rows(core(), kernel.endpoints),
                    "path_manager": core().config.kernel.path_manager}

        async def connections(_request: Request, _peer: Peer) -> Any:
            kernel = await report.read_kernel(core(), endpoints=False, limits=False)
            if kernel.subflows is None:
                raise CommandFailed(FAILED, kernel.errors.get("connections", "no connections"))
            return {"connections": report.connection_rows(core(), kernel.subflows,
                                                          kernel.listeners or [])}

        async def plugins(_request: Request, _peer: Peer) -> Any:
            return {"plugins": report.plugin_rows(core()),
                    "problems": [*self.load_problems, *core().plugin_problems]}

        async def limits(_request: Request, _peer: Peer) -> Any:
            kernel = await report.read_kernel(core(), endpoints=False, subflows=False)
            if kernel.limits is None:
                raise CommandFailed(FAILED, kernel.errors.get("limits", "no limits"))
            return report.limits_view(core(), kernel.limits)

        async def metrics(_request: Request, _peer: Peer) -> Any:
            body, content_type = await self._scrape()
            return {"content_type": content_type, "text": body.decode()}

        async def reload(_request: Request, peer: Peer) -> Any:
            self.log.info("reload requested over the control socket", uid=peer.uid,
                          pid=peer.pid)
            outcome = await self.reload()
            if outcome.problems:
                raise CommandFailed(CONFIG_ERROR, "reload refused: configuration error; the "
                                    "old configuration stays in force",
                                    {"problems": outcome.problems})
            if not outcome.ok:
                raise CommandFailed(FAILED, f"reload partly failed: {outcome.error}")
            return {"reloaded": True, "config": self.config_label,
                    "plugins": [row["name"] for row in report.plugin_rows(core())
                                if row["state"] == "active"]}

        commands = [
            Command("status", status),
            Command("endpoints", endpoints),
            Command("connections", connections),
            Command("plugins", plugins),
            Command("limits", limits),
            Command("metrics", metrics),
            Command("reload", reload, mutating=True, timeout=None),
        ]
        return {command.name: command for command in commands}

    async def _stop_core(self, *, undo: bool = False) -> bool:
        """Stop the core within STOP_TIMEOUT; False when it had to be cut short."""
        core = self.core
        assert core is not None
        try:
            await asyncio.wait_for(core.stop(undo=undo), STOP_TIMEOUT)
        except TimeoutError:
            self.log.error("stop timed out; leaving the rest", timeout=STOP_TIMEOUT)
            core.close()
            return False
        return True

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
        """Wait for a stop (signal, or a fatal core error) while serving
        reloads. A stop does not wait for a reload in progress: the reload is
        cancelled and the stop path leaves the kernel clean either way."""
        assert self.core is not None
        stop_wait = asyncio.create_task(self._stop.wait())
        fatal_wait = asyncio.create_task(self.core.failed.wait())
        stopping: set[asyncio.Task[Any]] = {stop_wait, fatal_wait}
        try:
            while True:
                reload_wait = asyncio.create_task(self._reload.wait())
                done, _ = await asyncio.wait(stopping | {reload_wait},
                                             return_when=asyncio.FIRST_COMPLETED)
                if done & stopping:
                    reload_wait.cancel()
                    break
                # A burst of SIGHUPs collapses into this one reload.
                self._reload.clear()
                reloading = asyncio.create_task(self.reload())
                done, _ = await asyncio.wait(stopping | {reloading},
                                             return_when=asyncio.FIRST_COMPLETED)
                if reloading not in done:
                    reloading.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reloading
                    self.log.warning("reload interrupted by stop")
                    break
        finally:
            for task in stopping:
                task.cancel()
            for task in stopping:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def reload(self) -> ReloadOutcome:
        """One reload at a time (SIGHUP and ``ctl reload`` share this)."""
        async with self._reload_lock:
            return await self._reload_once()

    async def _reload_once(self) -> ReloadOutcome:
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
            return ReloadOutcome(False, problems=list(exc.problems))
        self.load_problems = problems
        for problem in problems:
            self.log.error("plugin not loaded", error=problem)
        self._configure_logging(config)
        self.log = get_logger()
        core.log = self.log
        outcome = ReloadOutcome(True)
        try:
            await core.reload(config, available)
        except (KernelSettingsError, KernelError, NetlinkError) as exc:
            self.log.error("reload partly failed", error=str(exc))
            outcome = ReloadOutcome(False, error=str(exc))
        if self.control is not None:
            self.control.log = self.log
            try:
                self.control.set_group(core.config.daemon.control_group)
            except ControlError as exc:
                self.log.error("reload partly failed", error=str(exc))
                error = f"{outcome.error}; {exc}" if outcome.error else str(exc)
                outcome = ReloadOutcome(False, error=error)
        await self._start_metrics(core.config.metrics.listen)
        notify("READY=1", f"STATUS={core.status_line()}")
        self.log.info("reloaded", plugins=",".join(config.daemon.plugins))
        return outcome
