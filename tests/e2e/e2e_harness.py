"""A Debian 12 container with systemd as PID 1, for the end-to-end tests.

What works on a host without systemd as PID 1 (checked): debootstrap a
minbase rootfs once and keep it in a cache keyed on what goes into it;
boot it with ``systemd-nspawn --register=no --keep-unit --private-network
--volatile=overlay --boot`` (its own network namespace; the overlay keeps
the cached rootfs clean, every boot starts fresh); drive it with ``nsenter
-t LEADER -a`` (machinectl and ``systemctl -M`` need a host systemd); stop
it with SIGTERM to systemd-nspawn, which powers the container off.

Python packages reach the container as a wheelhouse built on the host
(the container has no network), bind-mounted read-only.

Every step is printed as it runs, with its duration, and a table of them
at the end (StepLog), so the CI log shows each step and where the time
went: cold, the rootfs and the wheelhouse are built; warm, they are cached.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

CACHE_DIR = Path(os.environ.get("MPTCPD_PY_E2E_CACHE", "/var/cache/mptcpd-py-e2e"))
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# systemd as PID 1, the journal, iproute2 (ip, ss, nstat), and what
# scripts/install.sh needs to build the venv, the shim and systemd-python.
ROOTFS_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "iproute2", "procps",
    "python3", "python3-venv", "python3-dev", "gcc", "libc6-dev", "pkg-config",
    "libsystemd-dev",
)
# Bump when the way the rootfs is made changes (the cache key includes it).
ROOTFS_RECIPE = 1
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

PROJECT = Path(__file__).resolve().parents[2]
SOURCE_INSIDE = "/root/mptcpd-py"
WHEELHOUSE_INSIDE = "/mnt/wheelhouse"


class StepLog:
    """Prints ``e2e ▸ step`` / ``e2e ✓ step (1.2 s)`` live, keeps the timings."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write
        self.timings: list[tuple[str, float]] = []
        self.started = time.monotonic()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.write(f"e2e ▸ {name}")
        start = time.monotonic()
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, pytest.skip.Exception):
                self.write(f"e2e - {name}: skipped")
            else:
                self.write(f"e2e ✗ {name} ({time.monotonic() - start:.1f} s): "
                           f"{type(exc).__name__}")
            raise
        elapsed = time.monotonic() - start
        self.timings.append((name, elapsed))
        self.write(f"e2e ✓ {name} ({elapsed:.1f} s)")

    def note(self, text: str) -> None:
        for line in text.splitlines():
            self.write(f"e2e   {line}")

    def summary(self) -> str:
        width = max((len(name) for name, _ in self.timings), default=10)
        lines = ["e2e step timings:"]
        lines += [f"  {name:<{width}}  {secs:6.1f} s" for name, secs in self.timings]
        lines.append(f"  {'total (module)':<{width}}  {time.monotonic() - self.started:6.1f} s")
        return "\n".join(lines)


class Unavailable(Exception):
    """This machine cannot boot the container; the message says why."""


def _dpkg_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=False).stdout.strip() or "amd64"


def unavailable_reason() -> str:
    """Why the e2e container cannot run here, or "" when it can try."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, debootstrap)"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/bootstrap.sh installs it)"
    if not os.path.exists("/proc/sys/net/mptcp"):
        return "kernel without MPTCP"
    return ""


def apt_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """$MPTCPD_PY_E2E_MIRROR, or the Debian mirror apt itself uses for the
    main suite (deb822 or one-line source files)."""
    if os.environ.get("MPTCPD_PY_E2E_MIRROR"):
        return os.environ["MPTCPD_PY_E2E_MIRROR"].rstrip("/")
    found: list[str] = []
    for path in sorted((sources_dir / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if ("deb" in fields.get("types", "").split()
                    and SUITE in fields.get("suites", "").split()
                    and fields.get("enabled", "yes") != "no"):
                found.extend(fields.get("uris", "").split())
    list_files = [sources_dir / "sources.list",
                  *sorted((sources_dir / "sources.list.d").glob("*.list"))]
    for path in list_files:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                words = [w for w in line.split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    found.append(words[1])
    for uri in found:
        if uri.startswith(("http://", "https://")):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def _key(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _flock(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _remove_stale(prefix: str, keep: Path) -> None:
    """Other generations of a cache entry, unless a run still uses them."""
    for old in CACHE_DIR.glob(f"{prefix}-*"):
        if old == keep or old.suffix == ".lock" or not old.is_dir():
            continue
        lock = old.with_name(old.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        finally:
            os.close(fd)
        shutil.rmtree(old, ignore_errors=True)
        lock.unlink(missing_ok=True)


def ensure_rootfs(say: Callable[[str], None]) -> tuple[Path, bool]:
    """The cached Debian 12 rootfs (built when missing); (path, was_cached)."""
    arch = _dpkg_arch()
    key = _key({"suite": SUITE, "arch": arch, "packages": ROOTFS_PACKAGES,
                "recipe": ROOTFS_RECIPE})
    root = CACHE_DIR / f"rootfs-{key}"
    done = root / ".mptcpd-py-e2e-complete"
    if done.exists():
        return root, True
    with _flock(CACHE_DIR / "build.lock"):
        if done.exists():  # another run built it while we waited
            return root, True
        mirror = apt_mirror()
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"debootstrap --variant=minbase {SUITE} from {mirror} into {root} "
            f"(+{len(ROOTFS_PACKAGES)} packages; once, then cached)")
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--arch={arch}",
             "--include=" + ",".join(ROOTFS_PACKAGES), SUITE, str(tmp), mirror],
            capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise Unavailable(f"debootstrap {SUITE} from {mirror} failed "
                              f"(exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}")
        # The downloaded .debs are not needed to boot (about 100 MB).
        for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        (tmp / ".mptcpd-py-e2e-complete").write_text(json.dumps(
            {"suite": SUITE, "mirror": mirror, "packages": ROOTFS_PACKAGES}) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        _remove_stale("rootfs", root)
    return root, False


def ensure_wheelhouse(project: Path, say: Callable[[str], None]) -> tuple[Path, bool]:
    """Wheels of the runtime dependencies (pinned by requirements.lock) and of
    the build backend, so the container installs offline; (path, was_cached)."""
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    wanted = [*pyproject["project"]["dependencies"], *pyproject["build-system"]["requires"]]
    lock = (project / "requirements.lock").read_text()
    key = _key({"wanted": wanted, "lock": lock, "python": sys.version_info[:2],
                "machine": os.uname().machine})
    house = CACHE_DIR / f"wheels-{key}"
    done = house / ".complete"
    if done.exists():
        return house, True
    with _flock(CACHE_DIR / "build.lock"):
        if done.exists():
            return house, True
        tmp = house.with_name(house.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        say(f"pip wheel: {len(wanted)} requirements into {house} (once, then cached)")
        # --use-pep517: systemd-python ships a bare setup.py; build it in an
        # isolated environment that has `wheel`.
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
             "--use-pep517", "-w", str(tmp), "-c", str(project / "requirements.lock"),
             *wanted],
            capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"pip wheel failed:\n{_tail(proc.stdout + proc.stderr)}")
        (tmp / ".complete").write_text("\n".join(wanted) + "\n")
        shutil.rmtree(house, ignore_errors=True)
        tmp.rename(house)
        _remove_stale("wheels", house)
    return house, False


def copy_source_tree(project: Path, dest: Path) -> None:
    """The project's files as a fresh clone would have them (plus uncommitted
    work), without .venv, caches or build output."""
    proc = subprocess.run(["git", "-C", str(project), "ls-files", "-z", "--cached", "--others",
                           "--exclude-standard"], capture_output=True, check=False)
    if proc.returncode == 0:
        for name in proc.stdout.decode().split("\0"):
            source = project / name
            if not name or not source.is_file():
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        return
    shutil.copytree(project, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", ".*_cache"))


def _term_with_parent() -> None:
    """If the test run dies, nspawn gets SIGTERM and powers the container off."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Container:
    """One booted container: ``run`` executes a command inside it."""

    def __init__(self, rootfs: Path, name: str, console_log: Path,
                 binds: Sequence[tuple[Path, str, bool]] = ()) -> None:
        self.rootfs = rootfs
        self.name = name
        self.console_log = console_log
        self.binds = binds
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self._rootfs_lock: int | None = None

    # --- lifecycle -------------------------------------------------------

    def boot(self, timeout: float = 90.0) -> None:
        # A shared lock on the rootfs: no other run deletes it while we boot from it.
        lock = self.rootfs.with_name(self.rootfs.name + ".lock")
        self._rootfs_lock = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._rootfs_lock, fcntl.LOCK_SH)
        cmd = ["systemd-nspawn", "-D", str(self.rootfs), "-M", self.name, "--register=no",
               "--keep-unit", "--private-network", "--volatile=overlay", "--boot",
               "--console=read-only"]
        for host, inside, read_only in self.binds:
            cmd.append(f"--bind{'-ro' if read_only else ''}={host}:{inside}")
        log = open(self.console_log, "wb")  # noqa: SIM115
        # preexec_fn only sets the parent-death signal, as lab.Netns.popen does.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT,
                                     preexec_fn=_term_with_parent)  # noqa: PLW1509
        log.close()
        deadline = time.monotonic() + timeout
        self.leader = self._wait(self._find_leader, deadline, "the container's systemd")
        self._wait(lambda: os.path.exists(f"/proc/{self.leader}/root/run/systemd/private"),
                   deadline, "systemd's private socket")
        state = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                         timeout=max(1.0, deadline - time.monotonic())).stdout.strip()
        if state not in ("running", "degraded"):
            raise Unavailable(f"the container's systemd reached {state!r}, not running:\n"
                              + self.console_tail())

    def _find_leader(self) -> int:
        assert self.proc is not None
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    with contextlib.suppress(OSError):
                        if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                            return int(child)
        return 0

    def _wait(self, predicate: Callable[[], Any], deadline: float, what: str) -> Any:
        assert self.proc is not None
        while True:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                raise Unavailable(f"systemd-nspawn exited with {self.proc.returncode} before "
                                  f"{what} was up:\n{self.console_tail()}")
            if time.monotonic() > deadline:
                raise Unavailable(f"no {what} within the boot timeout:\n"
                                  + self.console_tail())
            time.sleep(0.05)

    def console_tail(self, lines: int = 20) -> str:
        try:
            return _tail(self.console_log.read_text(errors="replace"), lines)
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to nspawn: the container powers off; SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._rootfs_lock is not None:
            os.close(self._rootfs_lock)
            self._rootfs_lock = None

    # --- inside ---------------------------------------------------------

    def run(self, args: Sequence[str], *, check: bool = True, timeout: float = 60.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in all the container's namespaces with a clean environment."""
        assert self.leader
        clean = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "",
                 "SYSTEMD_COLORS": "0", "HOME": "/root", **(env or {})}
        cmd = ["nsenter", "-t", str(self.leader), "-a", "env", "-i",
               *(f"{k}={v}" for k, v in clean.items()), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"in the container: {' '.join(args)} exited with "
                                 f"{proc.returncode}:\n{_tail(proc.stdout + proc.stderr, 30)}")
        return proc

    def sh(self, script: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-ec", script], **kwargs)

    def path(self, inside: str) -> Path:
        """A file inside the container, as the host sees it (through the leader).
        Not for /proc/sys/net: those files show the reader's network namespace,
        which would be the host's."""
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def journal(self, unit: str, *, since_cursor: str = "") -> list[dict[str, Any]]:
        args = ["journalctl", "-u", unit, "-o", "json", "--no-pager"]
        if since_cursor:
            args += ["--after-cursor", since_cursor]
        out = self.run(args).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]
