"""A valid config whose plugins never act under the configured path manager
(the default plugins with the userspace PM, say) is said to be ineffective,
at check-config (tests/unit/test_cli.py) and by the core at start and on
reload: a warning, derived from the hooks each plugin implements."""

from __future__ import annotations

from typing import Any

from recording_log import RecordingLog

from mptcpd_py.config import default_text, parse_config
from mptcpd_py.core import Core
from mptcpd_py.loader import Available, discover, schemas
from mptcpd_py.plugin import Plugin, idle_plugins_warnings


class Log(RecordingLog):
    def bind(self, **_fields: Any) -> Log:
        return self


def shipped() -> dict[str, Available]:
    available, problems = discover([])
    assert problems == []
    return available


def classes(available: dict[str, Available], *names: str) -> list[type[Plugin]]:
    return [available[name].cls for name in names]


def warnings_for(path_manager: str, *enabled: str) -> list[str]:
    available = shipped()
    return idle_plugins_warnings(path_manager, classes(available, *enabled),
                                 [found.cls for found in available.values()])


def test_the_default_plugins_under_the_userspace_pm_name_the_idle_one_and_those_that_act(
        ) -> None:
    assert warnings_for("userspace", "addr_adv", "backup_cellular") == [
        "kernel.path_manager = userspace: plugin addr_adv does nothing (it only implements "
        "endpoints, for the in-kernel path manager); other plugins that act under it: "
        "fullmesh, server_announce, sspi"]


def test_no_plugin_acting_under_the_pm_is_said_in_one_line() -> None:
    assert warnings_for("kernel", "sspi", "server_announce") == [
        "kernel.path_manager = kernel: no enabled plugin proposes endpoints (sspi only "
        "implements connection_established, subflow_closed, network_changed, for the "
        "userspace path manager; server_announce only implements connection_established, "
        "network_changed, for the userspace path manager); plugins that do: addr_adv, "
        "backup_cellular, fullmesh"]


def test_a_plugin_with_hooks_for_both_pms_is_not_idle_under_either() -> None:
    assert warnings_for("kernel", "addr_adv", "fullmesh", "backup_cellular") == []
    assert warnings_for("userspace", "fullmesh", "backup_cellular") == []
    assert [line.split(" does nothing")[0] for line in warnings_for("kernel", "fullmesh",
                                                                    "sspi")] == [
        "kernel.path_manager = kernel: plugin sspi"]


def test_no_plugin_enabled_is_a_choice_not_a_warning() -> None:
    assert warnings_for("userspace") == []


def test_what_is_named_comes_from_the_hooks_not_from_a_list_of_plugins() -> None:
    """A user's plugin counts like a shipped one, and one with no hook at all is idle."""

    def connection_established(self: Any, ctx: Any) -> None:
        return None

    mine = type("Mine", (Plugin,), {"name": "mine",
                                    "connection_established": connection_established})
    empty = type("Empty", (Plugin,), {"name": "empty"})
    lines = idle_plugins_warnings("userspace", [empty], [mine, empty])
    assert lines == ["kernel.path_manager = userspace: no enabled plugin acts on connections "
                     "(empty implements no hook); plugins that do: mine"]


def core_with(path_manager: str, plugins: list[str]) -> tuple[Core, Log, dict[str, Available]]:
    available = shipped()
    text = default_text().replace('path_manager = "kernel"',
                                  f'path_manager = "{path_manager}"')
    text = text.replace('plugins = ["addr_adv", "backup_cellular"]',
                        f"plugins = {plugins!r}".replace("'", '"'))
    config = parse_config(text, "<test>", schemas(available))  # nothing is written
    assert (config.kernel.path_manager, list(config.daemon.plugins)) == (path_manager, plugins)
    log = Log()
    return Core(config, available, log=log), log, available


def test_the_core_warns_when_it_starts_the_plugins_at_start_and_on_reload() -> None:
    """start() and reload() both start the plugins through _instantiate_plugins."""
    core, log, available = core_with("userspace", ["addr_adv", "backup_cellular"])
    core._instantiate_plugins(core.config, available)
    warned = [(event, fields["problem"]) for level, event, fields in log.lines
              if level == "warning"]
    assert warned == [("plugins do nothing under this path manager",
                       "kernel.path_manager = userspace: plugin addr_adv does nothing (it only "
                       "implements endpoints, for the in-kernel path manager); other plugins "
                       "that act under it: fullmesh, server_announce, sspi")]


def test_the_core_says_nothing_when_every_plugin_acts() -> None:
    core, log, available = core_with("userspace", ["sspi", "backup_cellular"])
    core._instantiate_plugins(core.config, available)
    assert [line for line in log.lines if line[0] == "warning"] == []
    assert [fields["plugin"] for level, event, fields in log.lines
            if event == "plugin enabled"] == ["sspi", "backup_cellular"]
