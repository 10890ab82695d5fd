"""Configuration: defaults, validation, and errors naming PATH:LINE: key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mptcpd_py.config import (
    DEFAULT_PATH,
    check_glob,
    default_text,
    load_config,
    parse_config,
)
from mptcpd_py.errors import ConfigError
from mptcpd_py.schema import STR_LIST, TABLE_LIST, Option, Schema

ROOT = Path(__file__).resolve().parents[2]

FLAGS = Option(STR_LIST, ["subflow"], "flags",
               choices=("signal", "subflow", "backup", "fullmesh", "laminar"))
SCHEMAS = {
    "addr_adv": Schema({"flags": FLAGS,
                        "interface": Option(TABLE_LIST, [], "rules", table=Schema(
                            {"match": Option("str", "*", "glob"), "flags": FLAGS}))}),
    "backup_cellular": Schema({"match": Option(STR_LIST, ["wwan*"], "globs"),
                               "detect_devtype": Option("bool", True, "x")}),
    "fullmesh": Schema({"max_subflows": Option("int", 8, "n", min=1, max=64)}),
}


def errors_of(text: str, schemas: dict[str, Schema] | None = SCHEMAS) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/x.toml", schemas)
    return info.value.problems


def test_builtin_defaults_are_the_shipped_file() -> None:
    assert default_text() == (ROOT / "conf" / "mptcpd.toml").read_text()
    cfg = parse_config(default_text(), "d", SCHEMAS)
    assert cfg.daemon.plugins == ("addr_adv", "backup_cellular")
    assert cfg.kernel.limits.subflows == 2 and cfg.kernel.limits.add_addr_accepted == 2
    assert cfg.network.exclude == ("docker*", "veth*", "br-*", "virbr*", "lo")
    assert cfg.plugin_config("addr_adv")["flags"] == ["subflow"]


def test_schema_defaults_match_the_shipped_file() -> None:
    """An omitted key means the same as the shipped file says (limits aside:
    omitted limits are left as the kernel has them)."""
    shipped = parse_config(default_text(), "d", SCHEMAS)
    minimal = parse_config("[daemon]\n", "m", SCHEMAS)
    assert minimal.daemon == shipped.daemon
    assert minimal.network == shipped.network
    assert minimal.routing == shipped.routing
    assert minimal.metrics == shipped.metrics
    assert minimal.kernel.limits.subflows is None


def test_missing_default_file_means_builtin_defaults() -> None:
    if os.path.lexists(DEFAULT_PATH):
        pytest.skip(f"{DEFAULT_PATH} exists on this machine")
    assert load_config(None, SCHEMAS).path == "<built-in defaults>"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[daemon]\nlog_level = 'verbose'\n",
         "/etc/x.toml:2: daemon.log_level: must be one of debug, info, warning, error"),
        ("[daemon]\n\nbogus = 1\n", "/etc/x.toml:3: daemon.bogus: unknown key"),
        ("[network]\ninclude = ['eth[0']\n",
         "/etc/x.toml:2: network.include: bad interface glob 'eth[0': unclosed '['"),
        ("[kernel.limits]\nsubflows = 9\n",
         "/etc/x.toml:2: kernel.limits.subflows: must be at most 8 (got 9)"),
        ("[kernel]\nenable_mptcp = 'yes'\n",
         "/etc/x.toml:2: kernel.enable_mptcp: must be true or false, not string 'yes'"),
        ("[daemon]\nreconcile_interval = 1e400\n",
         "/etc/x.toml:2: daemon.reconcile_interval: must be a finite number"),
        ("[daemon]\nstate_dir = 'run'\n",
         "/etc/x.toml:2: daemon.state_dir: must be an absolute path"),
        ("[metrics]\nlisten = '127.0.0.1:99999'\n",
         "/etc/x.toml:2: metrics.listen: port must be 1..65535"),
        ("[daemon]\ncontrol_group = 'no-such-group-xyz'\n",
         "/etc/x.toml:2: daemon.control_group: no such group"),
        ("[frobnicate]\na = 1\n", "/etc/x.toml:1: frobnicate: unknown section"),
        ("[daemon]\nplugins = ['addr_adv', 'nope']\n",
         "/etc/x.toml:2: daemon.plugins: unknown plugin 'nope' (available: addr_adv,"),
        ("[plugins.addr_adv]\nflags = ['subflow', 'turbo']\n",
         "/etc/x.toml:2: plugins.addr_adv.flags: unknown value 'turbo'"),
        ("[[plugins.addr_adv.interface]]\nmatch = 'eth*'\n[[plugins.addr_adv.interface]]\n"
         "match = 'wlan*'\nflags = 3\n",
         "/etc/x.toml:5: plugins.addr_adv.interface[1].flags: must be a list of strings"),
        ('[daemon]\nstate_dir = "/run/a\\u0000b"\n',
         "/etc/x.toml:2: daemon.state_dir: a path cannot contain a NUL character"),
        ('["\\u001b"]\n', '/etc/x.toml:1: "\\u001b": unknown section'),
        ('[daemon]\n"a b" = 1\n', '/etc/x.toml:2: daemon."a b": unknown key'),
        ('[plugins."x\\ny"]\n', '/etc/x.toml:1: plugins."x\\u000ay": unknown plugin'),
        ("[daemon\n", "/etc/x.toml:1: syntax:"),
        ("a = \"x\n", "/etc/x.toml:1: syntax:"),
    ],
)
def test_each_problem_is_one_line_naming_file_line_and_key(text: str, expected: str) -> None:
    """Keys that are not bare TOML keys are quoted and escaped: a newline or
    an escape sequence in a key can neither split nor garble the line."""
    problems = errors_of(text)
    assert any(p.startswith(expected) for p in problems), problems
    assert all(p.isprintable() for p in problems)


def test_all_problems_are_reported_not_only_the_first() -> None:
    problems = errors_of("[daemon]\nlog_level = 1\non_exit = 'maybe'\n[network]\nnope = 2\n")
    assert [p.split(":")[1] for p in problems] == ["2", "3", "5"]


def test_unreadable_empty_directory_and_bad_utf8(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[daemon]\nlog_level = \"\xff\"\n")
    cases = {
        str(empty): "file: is empty",
        str(tmp_path): "file: is a directory",
        str(bad): ":2: file: not valid UTF-8",
        str(tmp_path / "missing.toml"): "file: cannot read: No such file",
    }
    for path, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(path, SCHEMAS)
        assert expected in str(info.value), (path, info.value)


def test_comment_only_file_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("# nothing set\n")
    assert load_config(str(path), SCHEMAS).daemon.on_exit == "remove"


@pytest.mark.parametrize("glob", ["eth*", "wl?n0", "en[op]*", "lo"])
def test_good_globs(glob: str) -> None:
    assert check_glob(glob) is None


@pytest.mark.parametrize("glob", ["", "eth 0", "a/b", "[abc", "averyveryverylongname"])
def test_bad_globs(glob: str) -> None:
    assert check_glob(glob) is not None
