"""The configuration file: schema, defaults, validation with ``PATH:LINE: key: problem``.

With no file at the default path the daemon runs with the built-in
defaults, which are the shipped ``conf/mptcpd.toml`` (``default.toml`` in
the package; a test keeps the two identical).
"""

from __future__ import annotations

import fnmatch
import grp
import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Any

from mptcpd_py.control import MAX_SOCKET_PATH, SOCKET_NAME
from mptcpd_py.errors import ConfigError
from mptcpd_py.schema import (
    BOOL,
    FLOAT,
    INT,
    STR,
    STR_LIST,
    Option,
    Problem,
    Schema,
    validate_table,
)

if sys.version_info >= (3, 11):  # noqa: UP036 (tomli is the fallback before 3.11)
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_PATH = "/etc/mptcpd-py/mptcpd.toml"
ENDPOINT_FLAG_NAMES = ("signal", "subflow", "backup", "fullmesh", "laminar")
MAX_KERNEL_LIMIT = 8
IFNAMSIZ = 15


def check_glob(pattern: str) -> str | None:
    """Interface-name globs: fnmatch syntax, no '/', no blanks, balanced []."""
    if not pattern:
        return "empty interface glob"
    if "/" in pattern or any(c.isspace() for c in pattern):
        return f"bad interface glob {pattern!r}: interface names have no '/' or blanks"
    depth = 0
    for c in pattern:
        if c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
    if depth:
        return f"bad interface glob {pattern!r}: unclosed '['"
    if not any(c in pattern for c in "*?[") and len(pattern) > IFNAMSIZ:
        return f"bad interface glob {pattern!r}: longer than an interface name ({IFNAMSIZ})"
    try:
        re.compile(fnmatch.translate(pattern))
    except re.error as exc:
        return f"bad interface glob {pattern!r}: {exc}"
    return None


def _absolute(path: str) -> str | None:
    if "\0" in path:
        return f"a path cannot contain a NUL character (got {path!r})"
    return None if os.path.isabs(path) else f"must be an absolute path (got {path!r})"


def _state_dir(path: str) -> str | None:
    """An absolute path whose control socket's path fits a unix socket
    address (found here, not at start after the kernel was changed)."""
    problem = _absolute(path)
    if problem:
        return problem
    socket_path = os.path.join(path, SOCKET_NAME)
    length = len(os.fsencode(socket_path))
    if length > MAX_SOCKET_PATH:
        return (f"the control socket {socket_path} would be {length} bytes long, more than "
                f"a socket path takes ({MAX_SOCKET_PATH})")
    return None


def usable_path(path: object) -> bool:
    """What ``_absolute`` accepts (for values read before validation)."""
    return isinstance(path, str) and _absolute(path) is None


def _group_exists(name: str) -> str | None:
    if not name:
        return None
    try:
        grp.getgrnam(name)
    except KeyError:
        return f"no such group {name!r}"
    return None


def parse_listen(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` / ``[V6]:PORT`` -> (host, port); None when empty."""
    if not text:
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"must be HOST:PORT (got {text!r})")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1..65535 (got {port})")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be an IP address (got {host!r})") from None
    return host, port


def _check_listen(text: str) -> str | None:
    try:
        parse_listen(text)
    except ValueError as exc:
        return str(exc)
    return None


DAEMON = Schema(
    {
        "log_level": Option(STR, "info", "Least severe messages logged.",
                            choices=("debug", "info", "warning", "error")),
        "log_format": Option(STR, "auto", "auto: journal under systemd, console on a tty, "
                             "json otherwise.", choices=("auto", "journal", "json", "console")),
        "state_dir": Option(STR, "/run/mptcpd-py", "State file and control socket.",
                            check=_state_dir),
        "control_group": Option(STR, "", "Group allowed on the control socket besides root.",
                                check=_group_exists),
        "plugin_dirs": Option(STR_LIST, ["/etc/mptcpd-py/plugins.d"],
                              "Directories of drop-in policy plugins (*.py, owned by root).",
                              item_check=_absolute),
        "plugins": Option(STR_LIST, ["addr_adv", "backup_cellular"],
                          "Enabled policies, in order."),
        "on_exit": Option(STR, "remove", "What happens to the daemon's endpoints at exit "
                          "(a start that fails takes back what it did itself either way).",
                          choices=("remove", "keep")),
        "reconcile_interval": Option(FLOAT, 30.0, "Seconds between full resyncs with the kernel.",
                                     min=0.05, max=86400),
        "plugin_timeout": Option(FLOAT, 1.0, "Seconds a plugin hook may run before it is "
                                 "stopped and counted as a failure.", min=0.001, max=60),
        "plugin_max_failures": Option(INT, 5, "Consecutive failures after which a plugin is "
                                      "disabled.", min=1, max=1000),
    },
    "The daemon itself.",
)

LIMITS = Schema(
    {
        "subflows": Option(INT, None, "Extra subflows per connection (omitted: leave as is).",
                           min=0, max=MAX_KERNEL_LIMIT),
        "add_addr_accepted": Option(INT, None, "Peer ADD_ADDRs accepted per connection "
                                    "(omitted: leave as is).", min=0, max=MAX_KERNEL_LIMIT),
    },
    "`ip mptcp limits`. Omitted keys are left as the kernel has them.",
)

KERNEL = Schema(
    {
        "path_manager": Option(STR, "kernel", "net.mptcp.path_manager.",
                               choices=("kernel", "userspace")),
        "enable_mptcp": Option(BOOL, True, "Set net.mptcp.enabled=1 at start."),
    },
    "Kernel settings applied at start.",
)

NETWORK = Schema(
    {
        "existing": Option(BOOL, True, "Act on addresses present at start."),
        "skip_loopback": Option(BOOL, True, "Ignore loopback addresses and interfaces."),
        "skip_link_local": Option(BOOL, True, "Ignore 169.254/16 and fe80::/10."),
        "skip_ula": Option(BOOL, True, "Ignore IPv6 unique local addresses (fc00::/7)."),
        "skip_deprecated": Option(BOOL, True, "Ignore deprecated IPv6 addresses."),
        "require_default_route": Option(BOOL, False, "Only addresses whose interface has a "
                                        "default route of the same family."),
        "include": Option(STR_LIST, ["*"], "Interface name globs considered, in priority "
                          "order.", item_check=check_glob),
        "exclude": Option(STR_LIST, ["docker*", "veth*", "br-*", "virbr*", "lo"],
                          "Interface name globs never considered.", item_check=check_glob),
    },
    "Which addresses the policies see.",
)

ROUTING = Schema(
    {
        "source_routes": Option(BOOL, True, "Per-address policy rule + table via the "
                                "interface's gateway, so subflows leave through their own "
                                "interface."),
        "table_base": Option(INT, 10000, "Routing table of an interface: table_base + ifindex.",
                             min=256, max=4_000_000_000),
        "rule_priority": Option(INT, 10000, "Priority of the daemon's `ip rule`s (below "
                                "main's 32766).", min=1, max=32765),
    },
    "Source routing for endpoint addresses.",
)

METRICS = Schema(
    {"listen": Option(STR, "", "Prometheus listener HOST:PORT; empty = off.",
                      check=_check_listen)},
    "Prometheus metrics.",
)

SECTIONS: dict[str, Schema] = {
    "daemon": DAEMON,
    "kernel": KERNEL,
    "network": NETWORK,
    "routing": ROUTING,
    "metrics": METRICS,
}


@dataclass(frozen=True)
class DaemonConfig:
    log_level: str
    log_format: str
    state_dir: str
    control_group: str
    plugin_dirs: tuple[str, ...]
    plugins: tuple[str, ...]
    on_exit: str
    reconcile_interval: float
    plugin_timeout: float
    plugin_max_failures: int


@dataclass(frozen=True)
class LimitsConfig:
    subflows: int | None = None
    add_addr_accepted: int | None = None


@dataclass(frozen=True)
class KernelConfig:
    path_manager: str
    enable_mptcp: bool
    limits: LimitsConfig


@dataclass(frozen=True)
class NetworkConfig:
    existing: bool = True
    skip_loopback: bool = True
    skip_link_local: bool = True
    skip_ula: bool = True
    skip_deprecated: bool = True
    require_default_route: bool = False
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("docker*", "veth*", "br-*", "virbr*", "lo")


@dataclass(frozen=True)
class RoutingConfig:
    source_routes: bool
    table_base: int
    rule_priority: int


@dataclass(frozen=True)
class MetricsConfig:
    listen: str


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig
    kernel: KernelConfig
    network: NetworkConfig
    routing: RoutingConfig
    metrics: MetricsConfig
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    path: str = "<built-in defaults>"

    def plugin_config(self, name: str) -> Mapping[str, Any]:
        return self.plugins.get(name, MappingProxyType({}))


# ------------------------------------------------------------------ line index

_TABLE = re.compile(r"^\s*\[(\[)?\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY = re.compile(rf"^\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")


def _split_key(text: str) -> tuple[str, ...]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", text)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


class LineIndex:
    """Where each key of a TOML text is, so errors can say ``PATH:LINE``."""

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[Any, ...], int] = {}
        current: tuple[Any, ...] = ()
        array_counts: dict[tuple[Any, ...], int] = {}
        for number, line in enumerate(text.splitlines(), 1):
            table = _TABLE.match(line)
            if table:
                path = _split_key(table.group(2))
                if table.group(1):  # [[array.of.tables]]
                    index = array_counts.get(path, 0)
                    array_counts[path] = index + 1
                    current = (*path, index)
                    self.lines.setdefault(path, number)
                else:
                    current = path
                self.lines.setdefault(current, number)
                continue
            key = _KEY.match(line)
            if key:
                self.lines.setdefault((*current, *_split_key(key.group(1))), number)

    def line_of(self, path: tuple[Any, ...]) -> int:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return 1


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def key_text(key: str) -> str:
    """A key as TOML writes it: bare, or quoted with escapes, so a key made
    of blanks, quotes or control characters can neither split an error
    message nor send escape sequences to the terminal."""
    if _BARE_KEY.match(key):
        return key
    out = []
    for c in key:
        if c in '"\\':
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{key_text(str(part))}" if out else key_text(str(part))
    return out


# ------------------------------------------------------------------ loading


def read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(4 * 1024 * 1024 + 1)
    except IsADirectoryError:
        raise ConfigError([f"{path}:1: file: is a directory, not a configuration file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}:1: file: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > 4 * 1024 * 1024:
        raise ConfigError([f"{path}:1: file: larger than 4 MiB, not a configuration file"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [f"{path}:{line}: file: not valid UTF-8 (byte 0x{raw[exc.start]:02x})"]
        ) from None
    if not text.strip():
        raise ConfigError(
            [f"{path}:1: file: is empty (delete it to use the built-in defaults)"]
        )
    return text


def default_text() -> str:
    return resources.files("mptcpd_py").joinpath("default.toml").read_text("utf-8")


_SYNTAX_POS = re.compile(r"\(at line (\d+), column (\d+)\)")


def parse_toml(text: str, path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        pos = _SYNTAX_POS.search(msg)
        line = int(pos.group(1)) if pos else 1
        msg = _SYNTAX_POS.sub("", msg).strip().rstrip(".") or "invalid TOML"
        raise ConfigError([f"{path}:{line}: syntax: {msg}"]) from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError([f"{path}:1: syntax: {exc}"]) from None


PluginSchemas = Mapping[str, Schema]


def build_config(
    data: Mapping[str, Any],
    path: str,
    lines: LineIndex,
    plugin_schemas: PluginSchemas | None = None,
    unloaded: Mapping[str, str] | None = None,
) -> Config:
    """Validate parsed TOML into a :class:`Config`, or raise ConfigError with
    every problem found (not only the first). ``unloaded`` says why a plugin
    that did not load did not (by name), for the error of a config using it."""
    problems: list[Problem] = []
    values: dict[str, dict[str, Any]] = {}
    for section, schema in SECTIONS.items():
        raw = data.get(section, {})
        if not isinstance(raw, dict):
            problems.append(((section,), f"must be a table, not {type(raw).__name__}"))
            raw = {}
        raw = dict(raw)
        limits_raw = raw.pop("limits", None) if section == "kernel" else None
        values[section], sub = validate_table(schema, raw, (section,))
        problems.extend(sub)
        if section == "kernel":
            if limits_raw is not None and not isinstance(limits_raw, dict):
                problems.append((("kernel", "limits"), "must be a table"))
                limits_raw = None
            values["limits"], sub = validate_table(LIMITS, limits_raw or {}, ("kernel", "limits"))
            problems.extend(sub)
    for key in data:
        if key not in SECTIONS and key != "plugins":
            known = ", ".join([*SECTIONS, "plugins"])
            problems.append(((key,), f"unknown section (known sections: {known})"))

    plugin_values: dict[str, Mapping[str, Any]] = {}
    raw_plugins = data.get("plugins", {})
    if not isinstance(raw_plugins, dict):
        problems.append((("plugins",), "must be a table of [plugins.NAME] sections"))
        raw_plugins = {}
    if plugin_schemas is not None:

        def missing(name: str) -> str:
            if unloaded and name in unloaded:
                return f"plugin {name!r} not loaded: {unloaded[name]}"
            available = ", ".join(sorted(plugin_schemas)) or "none"
            return f"unknown plugin {name!r} (available: {available})"

        for name in values["daemon"]["plugins"]:
            if name not in plugin_schemas:
                problems.append((("daemon", "plugins"), missing(name)))
        for name, section_data in raw_plugins.items():
            if name not in plugin_schemas:
                problems.append((("plugins", name), missing(name)))
                continue
            if not isinstance(section_data, dict):
                problems.append((("plugins", name), "must be a table"))
                continue
            table, sub = validate_table(plugin_schemas[name], section_data, ("plugins", name))
            problems.extend(sub)
            plugin_values[name] = MappingProxyType(table)
        for name, schema in plugin_schemas.items():
            plugin_values.setdefault(name, MappingProxyType(schema.defaults()))
    if len(set(values["daemon"]["plugins"])) != len(values["daemon"]["plugins"]):
        problems.append((("daemon", "plugins"), "lists a plugin more than once"))

    if problems:
        raise ConfigError(
            [f"{path}:{lines.line_of(where)}: {_dotted(where)}: {what}" for where, what in problems]
        )
    d, k, n, r = values["daemon"], values["kernel"], values["network"], values["routing"]
    return Config(
        daemon=DaemonConfig(
            log_level=d["log_level"],
            log_format=d["log_format"],
            state_dir=d["state_dir"],
            control_group=d["control_group"],
            plugin_dirs=tuple(d["plugin_dirs"]),
            plugins=tuple(d["plugins"]),
            on_exit=d["on_exit"],
            reconcile_interval=float(d["reconcile_interval"]),
            plugin_timeout=float(d["plugin_timeout"]),
            plugin_max_failures=int(d["plugin_max_failures"]),
        ),
        kernel=KernelConfig(
            path_manager=k["path_manager"],
            enable_mptcp=k["enable_mptcp"],
            limits=LimitsConfig(**values["limits"]),
        ),
        network=NetworkConfig(
            existing=n["existing"],
            skip_loopback=n["skip_loopback"],
            skip_link_local=n["skip_link_local"],
            skip_ula=n["skip_ula"],
            skip_deprecated=n["skip_deprecated"],
            require_default_route=n["require_default_route"],
            include=tuple(n["include"]),
            exclude=tuple(n["exclude"]),
        ),
        routing=RoutingConfig(
            source_routes=r["source_routes"],
            table_base=r["table_base"],
            rule_priority=r["rule_priority"],
        ),
        metrics=MetricsConfig(listen=values["metrics"]["listen"]),
        plugins=MappingProxyType(plugin_values),
        path=path,
    )


def parse_config(
    text: str, path: str, plugin_schemas: PluginSchemas | None = None,
    unloaded: Mapping[str, str] | None = None,
) -> Config:
    return build_config(parse_toml(text, path), path, LineIndex(text), plugin_schemas,
                        unloaded)


def load_config(
    path: str | None = None, plugin_schemas: PluginSchemas | None = None,
    unloaded: Mapping[str, str] | None = None,
) -> Config:
    """The config at ``path``; with None, the default path or, when that file
    does not exist, the built-in defaults."""
    if path is None:
        if not os.path.lexists(DEFAULT_PATH):
            return parse_config(default_text(), "<built-in defaults>", plugin_schemas,
                                unloaded)
        path = DEFAULT_PATH
    return parse_config(read_text(path), path, plugin_schemas, unloaded)


def read_raw_daemon_section(path: str | None) -> Mapping[str, Any]:
    """The ``[daemon]`` table as written (for finding plugin_dirs before the
    plugins, and so their schemas, are known). Never raises."""
    try:
        if path is None:
            text = default_text() if not os.path.lexists(DEFAULT_PATH) else read_text(
                DEFAULT_PATH
            )
        else:
            text = read_text(path)
        daemon = tomllib.loads(text).get("daemon", {})
        return daemon if isinstance(daemon, dict) else {}
    except (ConfigError, tomllib.TOMLDecodeError, ValueError, RecursionError):
        return {}
