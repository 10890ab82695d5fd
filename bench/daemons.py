"""The two daemons under test, started the same way inside a namespace, and
what the harness reads of them from /proc.

mptcpd-py runs with the shipped configuration (state in a work directory,
no plugin directory); the C mptcpd with the equivalent command line (the
``addr_adv`` or ``sspi`` plugin, address flags ``subflow``, notify flags
``existing,skip_link_local,skip_loopback``, as its shipped mptcpd.conf
suggests). Both write their logs to a file in the work directory.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from importlib import resources
from typing import Any

from mptcpd_py.lab import DaemonProcess, LabError, Netns, read_log, rss_kib

MPTCPD_BINARY = "/usr/libexec/mptcpd"
MPTCPD_PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu/mptcpd", "/usr/lib/mptcpd",
                      "/usr/local/lib/mptcpd")


def sched_runtime_ns(pid: int) -> int:
    """CPU time of every live thread of ``pid``, in ns, from the scheduler's
    own accounting (``se.sum_exec_runtime``: exact, not 10 ms ticks)."""
    total = 0.0
    for path in glob.glob(f"/proc/{pid}/task/*/sched"):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("se.sum_exec_runtime"):
                        total += float(line.split(":", 1)[1])
                        break
        except OSError:
            continue  # a thread that just ended
    return int(total * 1_000_000)


def mptcpd_available() -> bool:
    return os.access(MPTCPD_BINARY, os.X_OK) and mptcpd_plugin_dir() is not None


def mptcpd_plugin_dir() -> str | None:
    for path in MPTCPD_PLUGIN_DIRS:
        if os.path.exists(os.path.join(path, "addr_adv.so")):
            return path
    return None


def py_config(state_dir: str, *, plugins: tuple[str, ...] | None = None,
              path_manager: str | None = None) -> str:
    """The shipped configuration, with state in ``state_dir``, no plugin
    directory, and optionally other plugins / path manager."""
    text = resources.files("mptcpd_py").joinpath("default.toml").read_text("utf-8")
    text = text.replace('state_dir = "/run/mptcpd-py"', f'state_dir = "{state_dir}"')
    text = text.replace('plugin_dirs = ["/etc/mptcpd-py/plugins.d"]', "plugin_dirs = []")
    if plugins is not None:
        text = text.replace('plugins = ["addr_adv", "backup_cellular"]',
                            "plugins = [" + ", ".join(f'"{p}"' for p in plugins) + "]")
    if path_manager is not None:
        text = text.replace('path_manager = "kernel"', f'path_manager = "{path_manager}"')
    return text


class Daemon:
    """What the scenarios need of either daemon."""

    name = ""
    pid = 0

    def start(self, *, wait: bool = True) -> None:
        """Start; with ``wait``, return once it is ready (READY=1 for
        mptcpd-py; mptcpd has no readiness signal: at once)."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Has it said READY=1 (always False for a daemon that cannot)?"""
        return False

    def stop(self) -> None:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def check_alive(self) -> None:
        """Raise LabError (with its log's tail) when it has exited."""
        raise NotImplementedError

    def cpu_ns(self) -> int:
        return sched_runtime_ns(self.pid)

    def drain(self) -> None:
        """Read what the daemon told its service manager, as systemd would."""

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    @property
    def started_at(self) -> float:
        raise NotImplementedError


class PyDaemon(Daemon):
    """``mptcpd-py run`` (lab.DaemonProcess: NOTIFY_SOCKET owned here)."""

    name = "mptcpd-py"

    def __init__(self, ns: Netns, workdir: str, *, plugins: tuple[str, ...] | None = None,
                 path_manager: str | None = None, log_level: str = "info",
                 env: dict[str, str] | None = None) -> None:
        self.process = DaemonProcess(
            ns, workdir, py_config(os.path.join(workdir, "state"), plugins=plugins,
                                   path_manager=path_manager),
            args=["--log-level", log_level], env=env)
        self.ready_after = 0.0

    def start(self, *, wait: bool = True) -> None:
        self.process.start(wait_ready=False)
        self.pid = self.process.pid
        if wait:
            self.ready_after = self.process.wait_notify("READY=1", 30)

    def ready(self) -> bool:
        self.drain()
        return "READY=1" in self.process.messages

    @property
    def started_at(self) -> float:
        return self.process.started_at

    def drain(self) -> None:
        if self.process._notify is not None:
            self.process.poll_notify()

    def alive(self) -> bool:
        return self.process.proc is not None and self.process.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise LabError("mptcpd-py exited:\n" + self.process.log_text()[-2000:])

    def stop(self) -> None:
        if self.alive():
            code = self.process.stop()
            if code != 0:
                raise LabError(f"mptcpd-py exited with {code}:\n"
                               + self.process.log_text()[-2000:])
        else:
            self.process.close()


class _Child(Daemon):
    """A daemon the harness runs as a plain child process (no sd_notify)."""

    proc: subprocess.Popen[Any] | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _end(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class CDaemon(_Child):
    """The C mptcpd 0.12 (Debian package), same namespace, same role.

    It has no sd_notify: "ready" is whatever the scenario observes (its
    endpoints in the kernel). It leaves its endpoints and limits behind at
    exit; the scenarios clean up after it.
    """

    name = "mptcpd"

    def __init__(self, ns: Netns, workdir: str, *, plugin: str = "addr_adv",
                 addr_flags: str = "subflow",
                 notify_flags: str = "existing,skip_link_local,skip_loopback") -> None:
        self.ns = ns
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.log_path = os.path.join(workdir, "mptcpd.log")
        plugin_dir = mptcpd_plugin_dir()
        if plugin_dir is None:
            raise LabError("mptcpd plugins not installed (Debian package mptcpd-plugins)")
        self.args = [MPTCPD_BINARY, "--log=stderr", f"--plugin-dir={plugin_dir}",
                     f"--path-manager={plugin}", f"--load-plugins={plugin}",
                     f"--addr-flags={addr_flags}", f"--notify-flags={notify_flags}"]
        self.proc: subprocess.Popen[Any] | None = None
        self._log: Any = None
        self._started_at = 0.0

    @property
    def started_at(self) -> float:
        return self._started_at

    def start(self, *, wait: bool = True) -> None:
        self._log = open(self.log_path, "a")  # noqa: SIM115
        self._started_at = time.monotonic()
        self.proc = self.ns.popen(self.args, stdout=self._log, stderr=self._log,
                                  stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def check_alive(self) -> None:
        if not self.alive():
            raise LabError(f"mptcpd exited with {self.proc.returncode if self.proc else '?'}:"
                           f"\n{self.log_text()[-2000:]}")

    def stop(self) -> None:
        self._end()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        return read_log(self.log_path)


class BareResponder(_Child):
    """``bench/bare_responder.py``: the least any Python daemon does per
    address (a yardstick for the endpoint rows, not a path manager)."""

    name = "bare Python responder"

    def __init__(self, ns: Netns, *args: str) -> None:
        """``args``: ``endpoints``, or ``userspace SOURCE``."""
        self.ns = ns
        self.args = list(args) or ["endpoints"]
        self.proc: subprocess.Popen[Any] | None = None

    def start(self, *, wait: bool = True) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = self.ns.popen([sys.executable, "-m", "bench.bare_responder", *self.args],
                                  cwd=root, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def check_alive(self) -> None:
        if not self.alive():
            raise LabError("the bare Python responder exited")

    def stop(self) -> None:
        self._end()
