"""The command line: exit codes and one-line errors (no kernel needed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mptcpd_py.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_check_config_accepts_the_shipped_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(ROOT / "conf" / "mptcpd.toml")]) == 0
    captured = capsys.readouterr()
    assert "OK (plugins: addr_adv, backup_cellular)" in captured.out
    assert captured.err == ""


@pytest.mark.parametrize(("settings", "warning"), [
    ('[kernel]\npath_manager = "userspace"\n',  # the default plugins
     "kernel.path_manager = userspace: plugin addr_adv does nothing (it only implements "
     "endpoints, for the in-kernel path manager); other plugins that act under it: "
     "fullmesh, server_announce, sspi"),
    ('plugins = ["fullmesh", "sspi"]\n',
     "kernel.path_manager = kernel: plugin sspi does nothing (it only implements "
     "connection_established, subflow_closed, network_changed, for the userspace path "
     "manager); other plugins that act under it: addr_adv, backup_cellular"),
    ('plugins = ["sspi"]\n',
     "kernel.path_manager = kernel: no enabled plugin proposes endpoints (sspi only implements "
     "connection_established, subflow_closed, network_changed, for the userspace path "
     "manager); plugins that do: addr_adv, backup_cellular, fullmesh"),
])
def test_check_config_warns_of_plugins_that_do_nothing_under_the_path_manager(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], settings: str, warning: str
        ) -> None:
    """Valid but ineffective: exit 0, OK, and a warning naming what would act."""
    cfg = tmp_path / "mptcpd.toml"
    cfg.write_text("[daemon]\nplugin_dirs = []\n" + settings)  # the shipped plugins only
    assert main(["check-config", str(cfg)]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"warning: {warning}\n"
    assert captured.out.startswith(f"{cfg}: OK (plugins: ")


def test_check_config_reports_each_problem_on_its_own_line_and_exits_78(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nlog_level = 3\n\n[plugins.addr_adv]\nflags = ['sideways']\n")
    assert main(["check-config", str(bad)]) == 78
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"{bad}:2: daemon.log_level: must be a string, not integer 3",
        f"{bad}:5: plugins.addr_adv.flags: unknown value 'sideways' "
        "(expected any of signal, subflow, backup, fullmesh, laminar)",
    ]


def test_check_config_refuses_a_state_dir_too_long_for_the_control_socket(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fits = "/run/" + "d" * (107 - len("/run/") - len("/control"))  # 107 bytes, the most
    cfg = tmp_path / "mptcpd.toml"
    cfg.write_text(f'[daemon]\nplugin_dirs = []\nstate_dir = "{fits}"\n')
    assert main(["check-config", str(cfg)]) == 0
    cfg.write_text(f'[daemon]\nplugin_dirs = []\nstate_dir = "{fits}d"\n')
    assert main(["check-config", str(cfg)]) == 78
    assert capsys.readouterr().err == (
        f"{cfg}:3: daemon.state_dir: the control socket {fits}d/control would be 108 bytes "
        "long, more than a socket path takes (107)\n")


def test_schema_lists_daemon_and_plugin_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(ROOT / "conf" / "mptcpd.toml"), "--schema"]) == 0
    out = capsys.readouterr().out
    for section in ("[daemon]", "[kernel.limits]", "[plugins.addr_adv]",
                    "[[plugins.addr_adv.interface]]", "[plugins.backup_cellular]"):
        assert f"`{section}`" in out


def test_schema_is_printed_for_a_config_it_would_refuse(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The schema is what helps fix a broken file."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nlog_level = 3\n\n[plugins.addr_adv]\nflags = ['sideways']\n")
    assert main(["check-config", str(bad), "--schema"]) == 0
    captured = capsys.readouterr()
    for section in ("[daemon]", "[kernel.limits]", "[plugins.addr_adv]",
                    "[plugins.backup_cellular]"):
        assert f"`{section}`" in captured.out
    assert captured.err == ""


def test_schema_into_a_closed_pipe_ends_quietly_with_0() -> None:
    """`check-config --schema | head`: the reader going away is no error."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "mptcpd_py", "check-config",
                               str(ROOT / "conf" / "mptcpd.toml"), "--schema"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_usage_errors_exit_64() -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 64
    with pytest.raises(SystemExit) as info:
        main(["run", "--log-level", "chatty"])
    assert info.value.code == 64


def test_run_with_a_broken_config_exits_78_with_one_line_and_no_traceback(
        tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[network]\ninclude = 'eth[0'\n")
    proc = subprocess.run([sys.executable, "-m", "mptcpd_py", "run", "-c", str(bad),
                           "--log-format", "console"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 78
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f"{bad}:2: network.include: bad interface glob 'eth[0': unclosed '['" in proc.stderr


def test_ctl_without_a_daemon_exits_69_with_one_line(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    socket_path = tmp_path / "control"
    assert main(["ctl", "--socket", str(socket_path), "status"]) == 69
    assert capsys.readouterr().err == (
        f"mptcpd-py ctl: the daemon is not running (no control socket at {socket_path})\n")


def test_ctl_monitor_waits_for_its_subscription_as_long_as_timeout_says(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    socket_path = str(tmp_path / "control")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # a daemon that never answers
    silent.bind(socket_path)
    try:
        assert main(["ctl", "--socket", socket_path, "--timeout", "0.2", "monitor"]) == 1
    finally:
        silent.close()
    assert capsys.readouterr().err == \
        "mptcpd-py ctl: no reply from the daemon to monitor within 0.2s\n"


def test_ctl_usage_errors_exit_64(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["ctl", "--socket", str(tmp_path / "control"), "restart"])
    assert info.value.code == 64
    assert "invalid choice: 'restart'" in capsys.readouterr().err
    assert main(["ctl", "--timeout", "0", "status"]) == 64


def test_check_config_never_imports_plugins_from_a_relative_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """plugin_dirs is read before the config is validated (plugins bring
    their schemas): a relative directory must be refused without running
    what is in it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dropins").mkdir(mode=0o755)
    marker = tmp_path / "imported"
    (tmp_path / "dropins" / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[daemon]\nplugin_dirs = ["dropins"]\n')
    assert main(["check-config", str(cfg)]) == 78
    assert not marker.exists()


MINIMAL_PLUGIN = '''
from mptcpd_py.plugin import Plugin


class MyPlug(Plugin):
    name = "myplug"
'''


def dropin(directory: Path, source: str, mode: int = 0o644) -> Path:
    directory.mkdir(mode=0o755, exist_ok=True)
    path = directory / "myplug.py"
    path.write_text(source)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize(("uses", "where"), [('plugins = ["myplug"]\n', "3: daemon.plugins"),
                                             ("plugins = []\n[plugins.myplug]\n",
                                              "4: plugins.myplug")])
def test_check_config_says_why_a_plugin_the_config_uses_did_not_load(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], uses: str, where: str) -> None:
    """Not "unknown plugin": the loader's own reason (DESIGN §4)."""
    plugdir = tmp_path / "plugins.d"
    path = dropin(plugdir, MINIMAL_PLUGIN, mode=0o664)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nplugin_dirs = ["{plugdir}"]\n{uses}')
    assert main(["check-config", str(cfg)]) == 78
    assert capsys.readouterr().err.splitlines() == [
        f"{cfg}:{where}: plugin 'myplug' not loaded: "
        f"{path}: refused: writable by group (mode 0664)"]


def test_check_config_names_a_plugin_s_syntax_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugdir = tmp_path / "plugins.d"
    path = dropin(plugdir, MINIMAL_PLUGIN + "    def broken(:\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nplugin_dirs = ["{plugdir}"]\nplugins = ["myplug"]\n')
    assert main(["check-config", str(cfg)]) == 78
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{cfg}:3: daemon.plugins: plugin 'myplug' not loaded: "
                           f"{path}:7: syntax error: ")


def test_check_config_names_a_refused_plugin_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugdir = tmp_path / "plugins.d"
    dropin(plugdir, MINIMAL_PLUGIN)
    os.chmod(plugdir, 0o777)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nplugin_dirs = ["{plugdir}"]\nplugins = ["myplug"]\n')
    assert main(["check-config", str(cfg)]) == 78
    assert capsys.readouterr().err.splitlines() == [
        f"{cfg}:3: daemon.plugins: plugin 'myplug' not loaded: {plugdir}: plugin directory "
        "refused: writable by group and others (mode 0777)"]


def test_plugin_dirs_as_one_string_is_a_one_item_list(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The schema takes a string for a list of strings; the plugins are
    looked for in that directory as well."""
    plugdir = tmp_path / "plugins.d"
    dropin(plugdir, MINIMAL_PLUGIN)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nplugin_dirs = "{plugdir}"\nplugins = ["myplug"]\n')
    assert main(["check-config", str(cfg)]) == 0
    assert f"{cfg}: OK (plugins: myplug)" in capsys.readouterr().out
