"""The state file: what the daemon owns in the kernel, so that it never
touches what it did not create, and so that a restart after a crash adopts
its leftovers instead of duplicating them.

Two files in ``state_dir`` (tmpfs /run by default): ``state.json``, a
snapshot written atomically (temp file + rename), and ``state.journal``,
one line appended *before* each endpoint is added (and after each
removal), which costs one write(2) on the add path instead of a whole
snapshot. The snapshot is rewritten after full passes, at exit, and once
the journal has grown to ``JOURNAL_LIMIT`` lines; in between the journal
is what makes a change durable. A crash between the journal line and the
kernel's reply leaves a record for an endpoint that may or may not exist;
the next start replays the journal and resolves it by comparing id and
address with a dump. A torn last line is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from mptcpd_py.netlink.types import Address, EndpointFlags, parse_address

STATE_VERSION = 1
JOURNAL_LIMIT = 64  # journal lines before checkpoint() folds them into the snapshot
_COMPACT = json.JSONEncoder(separators=(",", ":"))  # one encoder, not one per line


@dataclass(frozen=True, slots=True)
class OwnedEndpoint:
    id: int
    address: Address
    port: int
    flags: EndpointFlags
    ifindex: int
    plugin: str = ""

    @property
    def key(self) -> tuple[Address, int]:
        return (self.address, self.port)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "address": str(self.address), "port": self.port,
                "flags": int(self.flags), "ifindex": self.ifindex, "plugin": self.plugin}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OwnedEndpoint:
        return cls(int(data["id"]), parse_address(data["address"]), int(data.get("port", 0)),
                   EndpointFlags(int(data.get("flags", 0))), int(data.get("ifindex", 0)),
                   str(data.get("plugin", "")))


@dataclass(frozen=True, slots=True)
class OwnedRoute:
    """A rule + route pair of source routing, keyed by the address it serves."""

    address: Address
    ifindex: int
    table: int
    priority: int
    gateway: Address | None
    subnet: str  # the connected prefix also routed in the table ("" if none)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["address"] = str(self.address)
        data["gateway"] = str(self.gateway) if self.gateway else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OwnedRoute:
        gw = data.get("gateway")
        return cls(parse_address(data["address"]), int(data["ifindex"]), int(data["table"]),
                   int(data["priority"]), parse_address(gw) if gw else None,
                   str(data.get("subnet", "")))


@dataclass
class State:
    endpoints: dict[tuple[Address, int], OwnedEndpoint] = field(default_factory=dict)
    routes: dict[Address, OwnedRoute] = field(default_factory=dict)
    next_id: int = 1
    saved_limits: dict[str, int] | None = None  # the kernel's limits before we changed them
    saved_sysctls: dict[str, str] = field(default_factory=dict)
    pid: int = 0


@dataclass(frozen=True, slots=True)
class Inherited:
    """What the state file held when this process loaded it: endpoints and
    routes a previous daemon left for this one to adopt, and the originals
    it recorded. A failed start takes back only what it did itself."""

    endpoints: frozenset[tuple[Address, int]] = frozenset()
    routes: frozenset[Address] = frozenset()
    sysctls: frozenset[str] = frozenset()
    limits: bool = False

    @classmethod
    def of(cls, state: State) -> Inherited:
        return cls(frozenset(state.endpoints), frozenset(state.routes),
                   frozenset(state.saved_sysctls), state.saved_limits is not None)


class StateStore:
    """Load and save :class:`State` at ``state_dir/state.json``."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, "state.json")
        self.journal_path = os.path.join(state_dir, "state.journal")
        self.state = State()
        self.inherited = Inherited()  # set by load()
        self.problem = ""
        self.dirty = False
        self.journal_lines = 0
        self._journal_fd: int | None = None

    def load(self) -> State:
        """Read the file; a missing file is a fresh start, a corrupt one is
        set aside (``state.json.corrupt``) and reported, never fatal."""
        try:
            with open(self.path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError(f"unknown state version {data.get('version')!r}")
            state = State(
                endpoints={},
                routes={},
                next_id=int(data.get("next_id", 1)),
                saved_limits=data.get("saved_limits"),
                saved_sysctls=dict(data.get("saved_sysctls", {})),
                pid=int(data.get("pid", 0)),
            )
            for item in data.get("endpoints", []):
                owned = OwnedEndpoint.from_json(item)
                state.endpoints[owned.key] = owned
            for item in data.get("routes", []):
                route = OwnedRoute.from_json(item)
                state.routes[route.address] = route
        except FileNotFoundError:
            state = State()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.problem = f"{self.path}: unreadable state ({exc}); starting without it"
            with contextlib.suppress(OSError):
                os.replace(self.path, self.path + ".corrupt")
            state = State()
        self._replay(state)
        self.state = state
        self.inherited = Inherited.of(state)
        return state

    def _replay(self, state: State) -> None:
        try:
            with open(self.journal_path, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return
        except OSError as exc:
            self.problem = f"{self.journal_path}: unreadable ({exc.strerror})"
            return
        for line in lines:
            try:
                entry = json.loads(line)
                record = OwnedEndpoint.from_json(entry["ep"])
            except (ValueError, KeyError, TypeError):
                continue  # empty, or torn by a crash mid-write
            if entry.get("op") == "put":
                state.endpoints[record.key] = record
            elif entry.get("op") == "del":
                state.endpoints.pop(record.key, None)
            if entry.get("next_id"):
                state.next_id = int(entry["next_id"])
            self.journal_lines += 1
        self.dirty = True

    def _journal(self, op: str, record: OwnedEndpoint) -> None:
        line = _COMPACT.encode({"op": op, "ep": record.to_json(),
                                "next_id": self.state.next_id}).encode() + b"\n"
        if self._journal_fd is None:
            os.makedirs(self.state_dir, mode=0o755, exist_ok=True)
            self._journal_fd = os.open(self.journal_path,
                                       os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                       0o644)
        os.write(self._journal_fd, line)
        self.journal_lines += 1
        self.dirty = True

    def put_endpoint(self, record: OwnedEndpoint) -> None:
        """Own an endpoint (journaled at once: call before adding it)."""
        self.state.endpoints[record.key] = record
        self._journal("put", record)

    def drop_endpoint(self, record: OwnedEndpoint) -> None:
        if self.state.endpoints.pop(record.key, None) is not None:
            self._journal("del", record)

    def flush(self) -> None:
        """Write the snapshot if anything changed since the last one."""
        if self.dirty:
            self.save()

    def checkpoint(self) -> None:
        """After an ordinary pass: the journal already made each change
        durable, so the snapshot waits until the journal is long (a snapshot
        per address change cost more than the change itself)."""
        if self.dirty and self.journal_lines >= JOURNAL_LIMIT:
            self.save()

    def save(self) -> None:
        """Write atomically: a temp file next to it, then rename (this sits
        on the add path, so it is kept to a few syscalls)."""
        s = self.state
        data = {
            "version": STATE_VERSION,
            "pid": os.getpid(),
            "next_id": s.next_id,
            "endpoints": [e.to_json() for e in s.endpoints.values()],
            "routes": [r.to_json() for r in s.routes.values()],
            "saved_limits": s.saved_limits,
            "saved_sysctls": s.saved_sysctls,
        }
        payload = _COMPACT.encode(data).encode()
        tmp = self.path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            os.makedirs(self.state_dir, mode=0o755, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        # The snapshot now holds everything the journal said.
        if self._journal_fd is not None:
            os.ftruncate(self._journal_fd, 0)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.truncate(self.journal_path, 0)
        self.journal_lines = 0
        self.dirty = False

    def remove(self) -> None:
        for path in (self.path, self.journal_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def close(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
