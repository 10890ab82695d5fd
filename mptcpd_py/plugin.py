"""The plugin API: what a policy plugin is, the hooks it may implement and
what those hooks receive and return.

A plugin is a subclass of :class:`Plugin` in a module (a shipped one, a
``*.py`` file in a ``plugin_dirs`` directory, or a package exposed through
the ``mptcpd_py.plugins`` entry point; all three load the same way).

Plugins are pure policy. A hook gets immutable snapshots and returns
*intents*; it never gets a socket. The core validates, de-duplicates,
applies and audits every kernel write, and contains a plugin that raises,
hangs or returns nonsense. See ``docs/plugins.md`` for a complete example.

Two families of hooks:

* **In-kernel path manager** (``path_manager = "kernel"``): ``endpoints``
  is level-based. It receives the current network and the endpoints the
  plugins before it proposed, and returns the full list it wants. The
  core reconciles the kernel to the final list.
* **Userspace path manager** (``path_manager = "userspace"``): per
  connection events; each receives a :class:`ConnectionContext` whose
  methods (announce, remove, create_subflow, destroy_subflow, set_backup)
  record actions the core carries out after the hook returns.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from mptcpd_py.errors import PluginError
from mptcpd_py.model import Candidate, NetworkSnapshot
from mptcpd_py.netlink.types import Address, EndpointFlags, parse_address
from mptcpd_py.schema import Schema

__all__ = [
    "HOOKS",
    "Action",
    "Connection",
    "ConnectionContext",
    "EndpointFlags",
    "EndpointIntent",
    "Listener",
    "NetworkSnapshot",
    "Plugin",
    "RemoteAddress",
    "Subflow",
    "idle_plugins_warnings",
    "verify_plugin_class",
]


@dataclass(frozen=True, slots=True)
class EndpointIntent:
    """An endpoint a plugin wants to exist (in-kernel path manager)."""

    address: Address  # a plugin may give a string: the core parses it
    ifindex: int
    flags: EndpointFlags
    port: int = 0  # only with SIGNAL and without SUBFLOW (the kernel's rule)
    priority: tuple[Any, ...] = ()  # lower wins when the kernel's 8 slots are scarce
    reason: str = ""  # why, for logs and `ctl monitor`
    plugin: str = ""  # who proposed it (filled in by the core); after reason, as documented

    @classmethod
    def for_candidate(
        cls, candidate: Candidate, flags: EndpointFlags, reason: str = "", port: int = 0
    ) -> EndpointIntent:
        return cls(
            address=candidate.address.address,
            ifindex=candidate.interface.index,
            flags=flags,
            port=port,
            priority=candidate.priority,
            reason=reason,
        )

    @property
    def key(self) -> tuple[Address, int]:
        return (self.address, self.port)

    def with_flags(self, flags: EndpointFlags, reason: str = "") -> EndpointIntent:
        why = f"{self.reason}; {reason}" if self.reason and reason else (reason or self.reason)
        return replace(self, flags=flags, reason=why)


# ----------------------------------------------------------------- userspace PM


@dataclass(frozen=True, slots=True)
class RemoteAddress:
    """An address of the peer: the initial one (id 0) or an announced one."""

    id: int
    address: Address
    port: int = 0


@dataclass(frozen=True, slots=True)
class Subflow:
    local: Address
    local_port: int
    remote: Address
    remote_port: int
    local_id: int = 0
    remote_id: int = 0
    backup: bool = False
    ifindex: int = 0


@dataclass(frozen=True, slots=True)
class Connection:
    """One MPTCP connection, as the daemon knows it from events."""

    token: int
    local: Address
    local_port: int
    remote: Address
    remote_port: int
    server_side: bool = False
    established: bool = False
    subflows: tuple[Subflow, ...] = ()
    remotes: tuple[RemoteAddress, ...] = ()
    announced: tuple[tuple[int, Address, int], ...] = ()  # (local id, address, port)
    # Subflows the daemon asked for that are neither up nor failed yet, as
    # (local, remote, remote port): they count against a budget of subflows.
    pending: tuple[tuple[Address, Address, int], ...] = ()

    def has_subflow(self, local: Address, remote: Address, remote_port: int | None = None
                    ) -> bool:
        return any(
            s.local == local and s.remote == remote
            and (remote_port is None or s.remote_port == remote_port)
            for s in self.subflows
        )


@dataclass(frozen=True, slots=True)
class Listener:
    address: Address
    port: int


@dataclass(frozen=True, slots=True)
class Action:
    """One thing a userspace-PM hook asked for; carried out by the core."""

    kind: str  # announce | remove | create_subflow | destroy_subflow | set_backup
    token: int
    local: Address | None = None
    local_port: int = 0
    remote: Address | None = None
    remote_port: int = 0
    backup: bool = False
    plugin: str = ""
    reason: str = ""


class ConnectionContext:
    """What a userspace-PM hook works with: the connection, the network, and
    methods that record actions (nothing reaches the kernel until the hook
    has returned and the core has validated the actions)."""

    def __init__(self, conn: Connection, net: NetworkSnapshot, plugin: str = "") -> None:
        self.conn = conn
        self.net = net
        self.plugin = plugin
        self.actions: list[Action] = []

    def _add(self, kind: str, **kwargs: Any) -> None:
        """Record an action; a wrong type fails here, inside the plugin's hook,
        where the core contains it and names the plugin."""
        for key in ("local_port", "remote_port"):
            if key in kwargs:
                kwargs[key] = _port(kwargs[key], key)
        if not isinstance(kwargs.get("backup", False), bool):
            raise TypeError(f"{kind}: backup must be True or False, not {kwargs['backup']!r}")
        if not isinstance(kwargs.get("reason", ""), str):
            raise TypeError(f"{kind}: reason must be a string, not {kwargs['reason']!r}")
        self.actions.append(Action(kind=kind, token=self.conn.token, plugin=self.plugin,
                                   **kwargs))

    def announce(self, address: Address | str, port: int = 0, reason: str = "") -> None:
        """Send ADD_ADDR for a local address (the core picks its id, never 0)."""
        self._add("announce", local=parse_address(address), local_port=port, reason=reason)

    def remove(self, address: Address | str, reason: str = "") -> None:
        """Send RM_ADDR for an address this connection announced."""
        self._add("remove", local=parse_address(address), reason=reason)

    def create_subflow(
        self,
        local: Address | str,
        remote: Address | str | RemoteAddress | None = None,
        remote_port: int | None = None,
        backup: bool = False,
        reason: str = "",
    ) -> None:
        """Open a subflow from ``local`` to ``remote`` (default: the peer's
        initial address and port)."""
        if isinstance(remote, RemoteAddress):
            remote_port = remote_port or remote.port or self.conn.remote_port
            remote = remote.address
        target = self.conn.remote if remote is None else parse_address(remote)
        port = self.conn.remote_port if remote_port in (None, 0) else remote_port
        self._add("create_subflow", local=parse_address(local), remote=target,
                  remote_port=port, backup=backup, reason=reason)

    def destroy_subflow(self, subflow: Subflow, reason: str = "") -> None:
        self._add("destroy_subflow", local=subflow.local, local_port=subflow.local_port,
                  remote=subflow.remote, remote_port=subflow.remote_port, reason=reason)

    def set_backup(self, subflow: Subflow, backup: bool = True, reason: str = "") -> None:
        """MP_PRIO: mark a subflow as backup (or not)."""
        self._add("set_backup", local=subflow.local, local_port=subflow.local_port,
                  remote=subflow.remote, remote_port=subflow.remote_port, backup=backup,
                  reason=reason)


def _port(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ValueError(f"{what} must be a port number 0..65535, not {value!r}")
    return value


# ----------------------------------------------------------------- the base class


@dataclass(frozen=True)
class HookSpec:
    params: tuple[str, ...]
    doc: str
    path_manager: str = "userspace"  # the path manager under which the core calls it


HOOKS: Mapping[str, HookSpec] = {
    "endpoints": HookSpec(
        ("net", "proposed"),
        "In-kernel PM. Return every endpoint wanted, given the network and the "
        "endpoints earlier plugins proposed (return `proposed` to keep them).",
        path_manager="kernel",
    ),
    "connection_created": HookSpec(("ctx",), "A connection started (userspace PM)."),
    "connection_established": HookSpec(("ctx",), "A connection can take new subflows."),
    "connection_closed": HookSpec(("ctx",), "A connection ended."),
    "address_announced": HookSpec(("ctx", "remote"), "The peer announced an address."),
    "address_removed": HookSpec(("ctx", "remote_id"), "The peer withdrew an address."),
    "subflow_established": HookSpec(("ctx", "subflow"), "A subflow is up."),
    "subflow_closed": HookSpec(("ctx", "subflow"), "A subflow went away."),
    "subflow_priority": HookSpec(("ctx", "subflow"), "A subflow's backup flag changed."),
    "network_changed": HookSpec(
        ("ctx",), "The network changed (or a periodic resync): say what should exist now; "
        "called once per established connection."
    ),
    "listener_created": HookSpec(("listener", "net"), "An MPTCP listener appeared."),
    "listener_closed": HookSpec(("listener", "net"), "An MPTCP listener went away."),
}


class Plugin:
    """Base class of every policy plugin.

    Set ``name`` (what ``[daemon] plugins`` and ``[plugins.NAME]`` use) and
    ``options`` (the schema of ``[plugins.NAME]``), implement any of the
    hooks in :data:`HOOKS`. The class docstring is the plugin's user
    documentation. Helper methods must start with ``_``: any other public
    method must be a known hook, so a typo is an error, not a silent no-op.
    """

    name: ClassVar[str] = ""
    options: ClassVar[Schema] = Schema()

    def __init__(self, config: Mapping[str, Any], log: Any) -> None:
        self.config = config
        self.log = log

    @classmethod
    def implemented_hooks(cls) -> tuple[str, ...]:
        return tuple(
            hook for hook in HOOKS if getattr(cls, hook, None) is not getattr(Plugin, hook, None)
        )

    @classmethod
    def summary(cls) -> str:
        doc = inspect.getdoc(cls) or ""
        return doc.split("\n\n", 1)[0].replace("\n", " ")


def idle_plugins_warnings(path_manager: str, enabled: Sequence[type[Plugin]],
                          available: Iterable[type[Plugin]]) -> list[str]:
    """One line per problem when enabled plugins implement no hook that the
    core calls under ``path_manager`` (so they do nothing there), naming the
    available plugins that would act. The configuration is valid, only
    ineffective: these are warnings, not errors. An empty ``plugins`` list
    is a choice, not a mistake: nothing is said."""
    called = {hook for hook, spec in HOOKS.items() if spec.path_manager == path_manager}
    idle = [cls for cls in enabled if not called.intersection(cls.implemented_hooks())]
    if not idle:
        return []
    enabled_names = {cls.name for cls in enabled}
    fitting = sorted({cls.name for cls in available
                      if called.intersection(cls.implemented_hooks())} - enabled_names)
    acting = "proposes endpoints" if path_manager == "kernel" else "acts on connections"
    other = "userspace" if path_manager == "kernel" else "in-kernel"
    head = f"kernel.path_manager = {path_manager}"

    def why(cls: type[Plugin], subject: str) -> str:
        hooks = cls.implemented_hooks()
        if not hooks:
            return f"{subject} implements no hook"
        return f"{subject} only implements {', '.join(hooks)}, for the {other} path manager"

    if len(idle) == len(enabled):
        hint = f"; plugins that do: {', '.join(fitting)}" if fitting else ""
        return [f"{head}: no enabled plugin {acting} "
                f"({'; '.join(why(cls, cls.name) for cls in idle)}){hint}"]
    hint = f"; other plugins that act under it: {', '.join(fitting)}" if fitting else ""
    return [f"{head}: plugin {cls.name} does nothing ({why(cls, 'it')}){hint}" for cls in idle]


def verify_plugin_class(cls: type, origin: str) -> type[Plugin]:
    """Check a plugin class against the hook specs; errors name the plugin,
    the hook and the expected signature."""
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise PluginError(f"{origin}: not a subclass of mptcpd_py.plugin.Plugin")
    name = cls.name
    if not isinstance(name, str) or not name.isidentifier():
        raise PluginError(f"{origin}: plugin name must be an identifier (got {name!r})")
    if not isinstance(cls.options, Schema):
        raise PluginError(f"plugin {name} ({origin}): options must be a mptcpd_py.schema.Schema")
    for attr in dir(cls):
        if attr.startswith("_") or (attr in _BASE_ATTRS and attr not in HOOKS):
            continue
        value = getattr(cls, attr)
        if attr not in HOOKS:
            if callable(value) and not isinstance(value, type):
                known = ", ".join(HOOKS)
                raise PluginError(
                    f"plugin {name} ({origin}): unknown hook {attr!r} "
                    f"(hooks: {known}; helpers must start with '_')"
                )
            continue
        spec = HOOKS[attr]
        if getattr(Plugin, attr, None) is value:
            continue
        if not callable(value):
            raise PluginError(f"plugin {name} ({origin}): hook {attr} is not a method")
        try:
            params = list(inspect.signature(value).parameters.values())
        except (TypeError, ValueError) as exc:
            raise PluginError(f"plugin {name} ({origin}): hook {attr}: {exc}") from None
        names = tuple(p.name for p in params[1:])  # drop self
        if len(names) != len(spec.params) or any(
            p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params[1:]
        ):
            expected = ", ".join(("self", *spec.params))
            got = ", ".join(("self", *names))
            raise PluginError(
                f"plugin {name} ({origin}): hook {attr}({got}) does not match the "
                f"specification {attr}({expected})"
            )
    return cls


# Hooks exist on the base class as no-ops, so a plugin implements only what it needs.
def _noop(*_args: Any) -> None:
    return None


def _keep(self: Plugin, net: NetworkSnapshot, proposed: tuple[EndpointIntent, ...]
          ) -> Iterable[EndpointIntent]:
    return proposed


for _hook in HOOKS:
    setattr(Plugin, _hook, _keep if _hook == "endpoints" else _noop)
_BASE_ATTRS = set(dir(Plugin)) - set(HOOKS)


@dataclass
class PluginState:
    """The core's bookkeeping for one loaded plugin."""

    plugin: Plugin
    origin: str
    enabled: bool = True
    failures: int = 0
    total_failures: int = 0
    calls: int = 0
    disabled_reason: str = ""
    last_error: str = ""
    hooks: tuple[str, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return self.plugin.name

    @property
    def state(self) -> str:
        return "active" if self.enabled else f"disabled: {self.disabled_reason}"
