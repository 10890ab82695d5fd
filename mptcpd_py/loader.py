"""Finding and loading plugins: shipped ones and installed packages through
the ``mptcpd_py.plugins`` entry point, and ``*.py`` files in ``plugin_dirs``.
All end up in the same place, validated the same way.

A plugin runs as root, so a file (or its directory) that is not owned by
root or is writable by group or others is refused, with a log line saying
which and why.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import stat
import sys
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any

from mptcpd_py.errors import PluginError
from mptcpd_py.plugin import Plugin, verify_plugin_class
from mptcpd_py.schema import Schema

ENTRY_POINT_GROUP = "mptcpd_py.plugins"
_counter = itertools.count(1)


@dataclass(frozen=True)
class Available:
    """A plugin class that loaded and verified, and where it came from."""

    cls: type[Plugin]
    origin: str

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def schema(self) -> Schema:
        return self.cls.options


def plugin_class_of(module: ModuleType, origin: str) -> type[Plugin]:
    """The one Plugin subclass a module defines (or its ``PLUGIN`` attribute)."""
    explicit = getattr(module, "PLUGIN", None)
    if explicit is not None:
        return verify_plugin_class(explicit, origin)
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, Plugin)
        and value is not Plugin
        and value.__module__ == module.__name__
    ]
    if not found:
        raise PluginError(f"{origin}: defines no subclass of mptcpd_py.plugin.Plugin")
    if len(found) > 1:
        names = ", ".join(sorted(c.__name__ for c in found))
        raise PluginError(f"{origin}: defines several plugins ({names}); set PLUGIN = <class>")
    return verify_plugin_class(found[0], origin)


def unsafe_reason(path: str) -> str | None:
    """Why a file or directory may not be trusted to run as root, or None."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot stat: {exc.strerror}"
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "group and others" if st.st_mode & stat.S_IWOTH and st.st_mode & stat.S_IWGRP \
            else ("others" if st.st_mode & stat.S_IWOTH else "group")
        return f"writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def load_file(path: str) -> type[Plugin]:
    """Import one drop-in file under a fresh module name (a reload sees edits)."""
    reason = unsafe_reason(path)
    if reason:
        raise PluginError(f"{path}: refused: {reason}")
    stem = os.path.splitext(os.path.basename(path))[0]
    module_name = f"mptcpd_py_dropin_{stem}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        raise PluginError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except BaseException as exc:  # a plugin's import-time failure is its own
        sys.modules.pop(module_name, None)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise PluginError(f"{path}: exited while being imported") from None
        raise PluginError(f"{path}: import failed: {type(exc).__name__}: {exc}") from None
    return plugin_class_of(module, path)


def load_entry_point(ep: Any) -> type[Plugin]:
    origin = f"entry point {ep.name} ({ep.value})"
    try:
        loaded = ep.load()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise PluginError(f"{origin}: import failed: {type(exc).__name__}: {exc}") from None
    if isinstance(loaded, ModuleType):
        return plugin_class_of(loaded, origin)
    return verify_plugin_class(loaded, origin)


@dataclass
class Discovery:
    """What :func:`discover_plugins` found: the plugins that loaded, one line
    per one that did not, and those lines again by the name the failed
    plugin most likely has (a file's stem, an entry point's name), so that
    a config enabling it can say why it is missing."""

    available: dict[str, Available]
    problems: list[str]
    unloaded: dict[str, str]


def discover_plugins(plugin_dirs: tuple[str, ...] | list[str]) -> Discovery:
    """Every plugin that can be loaded, and why each other one cannot."""
    found: dict[str, Available] = {}
    problems: list[str] = []
    unloaded: dict[str, str] = {}

    def add(cls: type[Plugin], origin: str) -> None:
        if cls.name in found:
            problems.append(
                f"{origin}: plugin name {cls.name!r} is already provided by "
                f"{found[cls.name].origin}; this one is ignored"
            )
            return
        found[cls.name] = Available(cls, origin)

    def failed(name: str, problem: str) -> None:
        problems.append(problem)
        unloaded.setdefault(name, problem)

    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            add(load_entry_point(ep), f"entry point {ep.name} ({ep.value})")
        except PluginError as exc:
            failed(ep.name, str(exc))
    for directory in plugin_dirs:
        if not os.path.isdir(directory):
            continue  # an absent drop-in directory is normal
        entries = [e for e in sorted(os.listdir(directory))
                   if e.endswith(".py") and not e.startswith(".")]
        reason = unsafe_reason(directory)
        if reason:
            problem = f"{directory}: plugin directory refused: {reason}"
            problems.append(problem)
            for entry in entries:  # listed, never imported
                unloaded.setdefault(entry[:-3], problem)
            continue
        for entry in entries:
            path = os.path.join(directory, entry)
            try:
                add(load_file(path), path)
            except PluginError as exc:
                failed(entry[:-3], str(exc))
    return Discovery(found, problems, unloaded)


def discover(plugin_dirs: tuple[str, ...] | list[str]) -> tuple[dict[str, Available], list[str]]:
    """Every plugin that can be loaded, and one line per one that cannot."""
    found = discover_plugins(plugin_dirs)
    return found.available, found.problems


def schemas(available: dict[str, Available]) -> dict[str, Schema]:
    return {name: a.schema for name, a in available.items()}
