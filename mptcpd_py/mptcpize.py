"""``mptcpd-py mptcpize``: unmodified programs and services on MPTCP sockets.

``run CMD...`` executes CMD with ``LD_PRELOAD`` pointing at libmptcpize.so
(built from ``shim/mptcpize.c`` by the install script: it turns TCP
``socket()`` calls into MPTCP ones, falling back to TCP where the kernel
refuses) and ``GODEBUG=multipathtcp=1`` for Go programs, which make raw
system calls the shim cannot see.

``enable UNIT`` / ``disable UNIT`` do the same for a systemd service with a
drop-in, ``/etc/systemd/system/UNIT.d/mptcpize.conf``: the unit file itself
is never rewritten, and ``disable`` removes only a drop-in this command wrote.
The unit's own LD_PRELOAD / GODEBUG, which the drop-in keeps, are read from
its files without that drop-in: systemd's merged view includes it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mptcpd_py.errors import MptcpdError
from mptcpd_py.sysctl import read_mptcp_sysctl

EX_UNAVAILABLE = 69
EX_NOT_FOUND, EX_NOT_EXECUTABLE = 127, 126
SYSTEMD_SYSTEM_DIR = Path("/etc/systemd/system")
DROP_IN_NAME = "mptcpize.conf"
MARKER = "# Written by `mptcpd-py mptcpize enable`"
GO_MPTCP = "multipathtcp=1"
PRELOAD_KEYS = ("LD_PRELOAD", "GODEBUG")  # the variables the drop-in composes


class MptcpizeError(MptcpdError):
    """A unit or program mptcpize cannot work on; the message says why."""


def shim_path() -> Path:
    """Where the install script (or bootstrap.sh) built the shim for this install."""
    return Path(sys.prefix) / "lib" / "mptcpd-py" / "libmptcpize.so"


def _without(items: Sequence[str], unwanted: str) -> list[str]:
    return [item for item in items if item and item != unwanted]


def compose_environment(env: Mapping[str, str], shim: str) -> dict[str, str]:
    """LD_PRELOAD and GODEBUG with the shim and multipathtcp=1 added once,
    keeping whatever the program already preloads or sets for Go."""
    preload = _without(env.get("LD_PRELOAD", "").replace(":", " ").split(), shim)
    godebug = [item for item in env.get("GODEBUG", "").split(",")
               if item and not item.startswith("multipathtcp=")]
    return {"LD_PRELOAD": " ".join([*preload, shim]),
            "GODEBUG": ",".join([*godebug, GO_MPTCP])}


def mptcp_disabled_warning() -> str:
    """A warning when this namespace would make every socket fall back to TCP."""
    enabled = read_mptcp_sysctl("enabled")
    if enabled is None:
        return "this kernel has no MPTCP: the program's sockets stay TCP"
    if enabled == "0":
        return ("net.mptcp.enabled is 0 in this network namespace: "
                "the program's sockets stay TCP")
    return ""


def run_command(argv: Sequence[str], *, shim: Path | None = None) -> int:
    """exec ``argv`` on MPTCP; returns only when that is impossible."""
    args = list(argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        print("mptcpd-py mptcpize run: which command? e.g. mptcpize run curl URL",
              file=sys.stderr)
        return 64
    shim = shim or shim_path()
    if not shim.is_file():
        print(f"mptcpd-py mptcpize: {shim} is missing: scripts/install.sh builds it "
              "(scripts/bootstrap.sh in a development tree)", file=sys.stderr)
        return EX_UNAVAILABLE
    warning = mptcp_disabled_warning()
    if warning:
        print(f"mptcpd-py mptcpize: warning: {warning}", file=sys.stderr)
    env = {**os.environ, **compose_environment(os.environ, str(shim))}
    try:
        os.execvpe(args[0], args, env)
    except FileNotFoundError:
        print(f"mptcpd-py mptcpize run: {args[0]}: command not found", file=sys.stderr)
        return EX_NOT_FOUND
    except PermissionError:
        print(f"mptcpd-py mptcpize run: {args[0]}: permission denied", file=sys.stderr)
        return EX_NOT_EXECUTABLE
    except OSError as exc:
        print(f"mptcpd-py mptcpize run: {args[0]}: {exc.strerror}", file=sys.stderr)
        return EX_NOT_EXECUTABLE
    return 1  # pragma: no cover - execvpe does not return


# --- services ------------------------------------------------------------


def unit_name(name: str) -> str:
    """``nginx`` -> ``nginx.service``; only services run programs to preload into."""
    if "/" in name or not name or name.startswith("."):
        raise MptcpizeError(f"{name!r} is not a unit name")
    if "." not in name:
        return f"{name}.service"
    if not name.endswith(".service"):
        raise MptcpizeError(f"{name}: mptcpize works on services (*.service units)")
    return name


def _quote(assignment: str) -> str:
    """One Environment= word: quoted, with systemd's escapes and specifiers."""
    escaped = assignment.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def drop_in_text(unit: str, environment: Mapping[str, str]) -> str:
    words = " ".join(_quote(f"{key}={value}") for key, value in environment.items())
    return (f"{MARKER} for {unit}: its TCP sockets become MPTCP.\n"
            f"# Undo with `mptcpd-py mptcpize disable {unit}`; the unit file is untouched.\n"
            "[Service]\n"
            f"Environment={words}\n")


def parse_environment_property(value: str) -> dict[str, str]:
    """``systemctl show -p Environment --value`` output: quoted KEY=VALUE words."""
    out: dict[str, str] = {}
    for word in shlex.split(value):
        key, sep, val = word.partition("=")
        if sep:
            out[key] = val
    return out


def unit_file_assignments(text: str) -> Iterator[tuple[str, str, str]]:
    """(section, key, value) of a unit file, read as systemd does: comments,
    sections, and a line ending in a backslash continued on the next."""
    section, pending = "", ""
    for raw in text.splitlines():
        line = raw.strip()
        if line[:1] in ("#", ";"):
            # A comment, also inside a continued line; one ending in a
            # backslash continues nothing (systemd skips it first).
            continue
        line = pending + line
        if (len(line) - len(line.rstrip("\\"))) % 2:  # an unescaped final backslash
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if sep:
            yield section, key.strip(), value.strip()


def _without_specifiers(value: str, where: str) -> str:
    """``%%`` is a literal ``%``; any other specifier (``%i``, ``%n``...) is
    systemd's to resolve, and a value built from one cannot be recomposed here."""
    parts = value.split("%%")
    if any("%" in part for part in parts):
        raise MptcpizeError(f"{where} uses a systemd specifier (%...), which mptcpize "
                            "cannot resolve; write the value out there")
    return "%".join(parts)


def unit_environment(files: Sequence[Path]) -> dict[str, str]:
    """LD_PRELOAD and GODEBUG as the [Service] Environment= lines of these
    unit files (the fragment, then its drop-ins in systemd's order) set them;
    an empty ``Environment=`` resets what came before, as in systemd."""
    env: dict[str, str] = {}
    for path in files:
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue  # gone since systemd loaded it: the reload after ours drops it too
        except OSError as exc:
            raise MptcpizeError(f"{path}: {exc.strerror}") from None
        for section, key, value in unit_file_assignments(text):
            if section != "Service" or key != "Environment":
                continue
            if not value:
                env = {}
                continue
            try:
                words = shlex.split(value)
            except ValueError:
                raise MptcpizeError(f"{path}: Environment={value}: unbalanced quotes") from None
            for word in words:
                name, sep, val = word.partition("=")
                if sep and name in PRELOAD_KEYS:
                    env[name] = _without_specifiers(val, f"{path}: {name}")
    return env


def environment_file_warnings(files: Sequence[str], shim: str) -> list[str]:
    """What an EnvironmentFile= undoes: its LD_PRELOAD or GODEBUG override
    any Environment=, our drop-in's included."""
    warnings = []
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError:
            continue  # read at each start; it may not exist yet
        for raw in text.splitlines():
            key, sep, value = raw.strip().removeprefix("export ").partition("=")
            key = key.strip()
            if not sep or key not in PRELOAD_KEYS:
                continue
            if key == "LD_PRELOAD" and shim not in value:
                warnings.append(f"{name} (EnvironmentFile=) sets LD_PRELOAD, which overrides "
                                f"the drop-in's: add {shim} to it there, or the service "
                                "stays on TCP")
            elif key == "GODEBUG" and GO_MPTCP not in value:
                warnings.append(f"{name} (EnvironmentFile=) sets GODEBUG, which overrides "
                                f"the drop-in's: add {GO_MPTCP} to it there, or Go programs "
                                "stay on TCP")
    return warnings


@dataclass(frozen=True)
class UnitState:
    name: str
    load_state: str
    active_state: str
    fragment_path: str = ""
    drop_in_paths: tuple[str, ...] = ()
    environment_files: tuple[str, ...] = ()
    needs_reload: bool = False


class Systemd:
    """The few systemctl calls mptcpize needs."""

    def __init__(self, unit_dir: Path = SYSTEMD_SYSTEM_DIR) -> None:
        self.unit_dir = unit_dir

    @staticmethod
    def available() -> bool:
        return os.path.isdir("/run/systemd/system")

    def _systemctl(self, *args: str) -> str:
        try:
            proc = subprocess.run(["systemctl", *args], capture_output=True, text=True,
                                  timeout=120, check=False)
        except FileNotFoundError:
            raise MptcpizeError("systemctl not found") from None
        if proc.returncode != 0:
            detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            raise MptcpizeError(f"systemctl {' '.join(args)}: "
                                f"{detail[-1] if detail else f'exit {proc.returncode}'}")
        return proc.stdout

    def state(self, unit: str) -> UnitState:
        out = self._systemctl("show", "-p", "LoadState", "-p", "ActiveState",
                              "-p", "FragmentPath", "-p", "DropInPaths",
                              "-p", "EnvironmentFiles", "-p", "NeedDaemonReload", unit)
        props: dict[str, str] = {}
        environment_files = []
        for line in out.splitlines():
            key, _, value = line.partition("=")
            if key == "EnvironmentFiles":  # one line each: "PATH (ignore_errors=yes)"
                environment_files.append(value.rpartition(" (ignore_errors=")[0] or value)
            props[key] = value
        return UnitState(unit, props.get("LoadState", ""), props.get("ActiveState", ""),
                         props.get("FragmentPath", ""),
                         tuple(props.get("DropInPaths", "").split()),
                         tuple(environment_files), props.get("NeedDaemonReload") == "yes")

    def daemon_reload(self) -> None:
        self._systemctl("daemon-reload")

    def try_restart(self, unit: str) -> None:
        self._systemctl("try-restart", unit)


def drop_in_path(unit_dir: Path, unit: str) -> Path:
    return unit_dir / f"{unit}.d" / DROP_IN_NAME


def written_by_us(path: Path) -> bool:
    try:
        return path.read_text().startswith(MARKER)
    except FileNotFoundError:
        return False


def write_drop_in(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(path)


def _apply(systemd: Systemd, unit: str, state: UnitState, restart: bool) -> str:
    """Restart a running service so the change takes effect; say what happened."""
    if state.active_state not in ("active", "activating", "reloading"):
        return "; takes effect at its next start"
    if not restart:
        return f"; restart it to take effect (systemctl restart {unit})"
    systemd.try_restart(unit)
    return "; restarted"


def _warn_on_stderr(message: str) -> None:
    print(f"mptcpd-py mptcpize: warning: {message}", file=sys.stderr)


def enable(name: str, systemd: Systemd, *, shim: Path, restart: bool = True,
           warn: Callable[[str], None] = _warn_on_stderr) -> str:
    """Write the drop-in, reload systemd and restart the service if it runs."""
    unit = unit_name(name)
    if not shim.is_file():
        raise MptcpizeError(f"{shim} is missing: scripts/install.sh builds it")
    state = systemd.state(unit)
    if state.load_state != "loaded":
        raise MptcpizeError(f"{unit}: no such unit (LoadState={state.load_state or '?'})")
    path = drop_in_path(systemd.unit_dir, unit)
    if path.exists() and not written_by_us(path):
        raise MptcpizeError(f"{path} exists and was not written by mptcpize; left alone")
    if state.needs_reload:  # the unit changed on disk: list its drop-ins as they are now
        systemd.daemon_reload()
        state = systemd.state(unit)
    # The unit's own LD_PRELOAD / GODEBUG are kept (ours replace them otherwise),
    # read from its files without our drop-in: systemd's merged Environment
    # holds what the last `enable` wrote, not what the unit says now.
    files = [Path(name) for name in (state.fragment_path, *state.drop_in_paths)
             if name and Path(name).resolve() != path.resolve()]
    environment = compose_environment(unit_environment(files), str(shim))
    for warning in environment_file_warnings(state.environment_files, str(shim)):
        warn(warning)
    write_drop_in(path, drop_in_text(unit, environment))
    systemd.daemon_reload()
    return f"{unit}: MPTCP enabled ({path}){_apply(systemd, unit, state, restart)}"


def disable(name: str, systemd: Systemd, *, restart: bool = True) -> str:
    """Remove our drop-in (only ours), reload systemd, restart if it runs."""
    unit = unit_name(name)
    path = drop_in_path(systemd.unit_dir, unit)
    if not path.exists():
        return f"{unit}: MPTCP was not enabled by mptcpize (no {path})"
    if not written_by_us(path):
        raise MptcpizeError(f"{path} was not written by mptcpize; left alone")
    path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # fails when other drop-ins live there: fine
    systemd.daemon_reload()
    return (f"{unit}: MPTCP disabled ({path} removed)"
            f"{_apply(systemd, unit, systemd.state(unit), restart)}")


# --- command line ---------------------------------------------------------


def add_mptcpize_parser(sub: Any) -> None:
    parser = sub.add_parser("mptcpize", help="run programs or services on MPTCP sockets",
                            description="Make unmodified programs use MPTCP instead of TCP.")
    actions = parser.add_subparsers(dest="mptcpize_action", metavar="ACTION",
                                    parser_class=type(parser))
    actions.required = True
    run = actions.add_parser("run", help="run CMD with its TCP sockets as MPTCP")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD [ARG...]")
    for action, text in (("enable", "make a systemd service use MPTCP (a drop-in)"),
                         ("disable", "undo enable")):
        p = actions.add_parser(action, help=text)
        p.add_argument("unit", metavar="UNIT", help="service name, e.g. nginx or nginx.service")
        p.add_argument("--no-restart", action="store_true",
                       help="do not restart the service when it is running")


def run_mptcpize(args: argparse.Namespace) -> int:
    if args.mptcpize_action == "run":
        return run_command(args.argv)
    systemd = Systemd()
    if not Systemd.available():
        print("mptcpd-py mptcpize: systemd is not running here", file=sys.stderr)
        return EX_UNAVAILABLE
    try:
        if args.mptcpize_action == "enable":
            message = enable(args.unit, systemd, shim=shim_path(), restart=not args.no_restart)
        else:
            message = disable(args.unit, systemd, restart=not args.no_restart)
    except MptcpizeError as exc:
        print(f"mptcpd-py mptcpize: {exc}", file=sys.stderr)
        return 1
    print(message)
    return 0
