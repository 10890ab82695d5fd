"""mptcpize's pure parts: the environment it composes, unit names, the
drop-in it writes and removes (the systemctl calls are faked here; the
e2e test runs them against a real systemd)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mptcpd_py.cli import main
from mptcpd_py.mptcpize import (
    MARKER,
    MptcpizeError,
    Systemd,
    UnitState,
    compose_environment,
    disable,
    drop_in_text,
    enable,
    environment_file_warnings,
    parse_environment_property,
    run_command,
    unit_environment,
    unit_name,
)

SHIM = "/opt/mptcpd-py/lib/mptcpd-py/libmptcpize.so"


def test_environment_adds_the_shim_and_go_mptcp_once() -> None:
    assert compose_environment({}, SHIM) == {"LD_PRELOAD": SHIM, "GODEBUG": "multipathtcp=1"}
    once = compose_environment({}, SHIM)
    assert compose_environment(once, SHIM) == once


def test_environment_keeps_what_the_program_already_preloads_and_sets_for_go() -> None:
    env = {"LD_PRELOAD": "/usr/lib/a.so:/usr/lib/b.so", "GODEBUG": "http2client=0,multipathtcp=0"}
    assert compose_environment(env, SHIM) == {
        "LD_PRELOAD": f"/usr/lib/a.so /usr/lib/b.so {SHIM}",
        "GODEBUG": "http2client=0,multipathtcp=1",
    }


@pytest.mark.parametrize(("given", "expected"), [
    ("nginx", "nginx.service"), ("nginx.service", "nginx.service"),
    ("getty@tty1.service", "getty@tty1.service"),
])
def test_unit_names_default_to_services(given: str, expected: str) -> None:
    assert unit_name(given) == expected


@pytest.mark.parametrize(("given", "problem"), [
    ("sshd.socket", "works on services"), ("../etc/passwd", "not a unit name"),
    ("", "not a unit name"),
])
def test_unit_names_that_cannot_be_mptcpized_are_refused(given: str, problem: str) -> None:
    with pytest.raises(MptcpizeError, match=problem):
        unit_name(given)


def test_drop_in_quotes_values_and_escapes_specifiers() -> None:
    text = drop_in_text("x.service", {"LD_PRELOAD": "/a b/c.so", "GODEBUG": 'q"%s\\'})
    assert text.startswith(MARKER)
    assert text.splitlines()[2:] == [
        "[Service]",
        'Environment="LD_PRELOAD=/a b/c.so" "GODEBUG=q\\"%%s\\\\"',
    ]


def test_systemctl_show_environment_is_parsed_with_its_quoting() -> None:
    assert parse_environment_property('A=1 "B=two words" C=') == {
        "A": "1", "B": "two words", "C": ""}


class FakeSystemd(Systemd):
    """systemctl replaced by a record of calls (the e2e test uses the real one).
    Like systemd, it lists the unit's drop-ins, mptcpize's own included."""

    def __init__(self, unit_dir: Path, *, active: str = "active",
                 environment: str = "", load: str = "loaded",
                 environment_files: tuple[str, ...] = ()) -> None:
        super().__init__(unit_dir)
        self.calls: list[str] = []
        self.active = active
        self.load = load
        self.environment_files = environment_files
        self.needs_reload = False
        self.fragments = unit_dir / "lib"
        self.fragments.mkdir(exist_ok=True)
        self.write_unit("web.service", environment)

    def write_unit(self, unit: str, environment: str) -> None:
        """The unit's file (its vendor copy, outside unit_dir), as an admin edits it."""
        lines = ["[Service]", "ExecStart=/usr/bin/web"]
        if environment:
            lines.append(f"Environment={environment}")
        (self.fragments / unit).write_text("\n".join(lines) + "\n")
        self.needs_reload = True

    def state(self, unit: str) -> UnitState:
        drop_ins = sorted(str(p) for p in (self.unit_dir / f"{unit}.d").glob("*.conf"))
        return UnitState(unit, self.load, self.active, str(self.fragments / unit),
                         tuple(drop_ins), self.environment_files, self.needs_reload)

    def daemon_reload(self) -> None:
        self.calls.append("daemon-reload")
        self.needs_reload = False

    def try_restart(self, unit: str) -> None:
        self.calls.append(f"try-restart {unit}")


@pytest.fixture
def shim(tmp_path: Path) -> Path:
    path = tmp_path / "libmptcpize.so"
    path.write_bytes(b"")
    return path


def test_enable_writes_a_drop_in_reloads_and_restarts_a_running_service(
        tmp_path: Path, shim: Path) -> None:
    systemd = FakeSystemd(tmp_path, environment="GODEBUG=x=1")
    systemd.needs_reload = False
    message = enable("web", systemd, shim=shim)
    dropin = tmp_path / "web.service.d" / "mptcpize.conf"
    assert f'"LD_PRELOAD={shim}" "GODEBUG=x=1,multipathtcp=1"' in dropin.read_text()
    assert systemd.calls == ["daemon-reload", "try-restart web.service"]
    assert message.endswith("; restarted")


def test_enable_leaves_a_stopped_service_stopped_and_says_when_it_takes_effect(
        tmp_path: Path, shim: Path) -> None:
    systemd = FakeSystemd(tmp_path, active="inactive")
    systemd.needs_reload = False
    assert enable("web", systemd, shim=shim).endswith("takes effect at its next start")
    assert systemd.calls == ["daemon-reload"]


def test_enable_refuses_unknown_units_and_a_drop_in_it_did_not_write(
        tmp_path: Path, shim: Path) -> None:
    with pytest.raises(MptcpizeError, match="no such unit"):
        enable("ghost", FakeSystemd(tmp_path, load="not-found"), shim=shim)
    foreign = tmp_path / "web.service.d" / "mptcpize.conf"
    foreign.parent.mkdir()
    foreign.write_text("[Service]\nEnvironment=MINE=1\n")
    with pytest.raises(MptcpizeError, match="not written by mptcpize"):
        enable("web", FakeSystemd(tmp_path), shim=shim)
    assert foreign.read_text() == "[Service]\nEnvironment=MINE=1\n"


def test_enable_again_follows_the_units_changed_environment_not_its_own_drop_in(
        tmp_path: Path, shim: Path) -> None:
    systemd = FakeSystemd(tmp_path, environment="LD_PRELOAD=/usr/lib/a.so")
    dropin = tmp_path / "web.service.d" / "mptcpize.conf"
    enable("web", systemd, shim=shim)
    assert f'"LD_PRELOAD=/usr/lib/a.so {shim}"' in dropin.read_text()
    systemd.write_unit("web.service", "LD_PRELOAD=/usr/lib/b.so")
    systemd.calls.clear()
    enable("web", systemd, shim=shim)
    assert f'"LD_PRELOAD=/usr/lib/b.so {shim}"' in dropin.read_text()
    # The edit was not reloaded yet: reloaded first, so the drop-in list is current.
    assert systemd.calls == ["daemon-reload", "daemon-reload", "try-restart web.service"]
    systemd.write_unit("web.service", "")
    enable("web", systemd, shim=shim)
    assert f'"LD_PRELOAD={shim}" "GODEBUG=multipathtcp=1"' in dropin.read_text()


def test_enable_reads_the_units_other_drop_ins_in_order(tmp_path: Path, shim: Path) -> None:
    systemd = FakeSystemd(tmp_path, environment="LD_PRELOAD=/usr/lib/a.so GODEBUG=x=1")
    drop_ins = tmp_path / "web.service.d"
    drop_ins.mkdir()
    (drop_ins / "10-reset.conf").write_text("[Service]\nEnvironment=\n")
    (drop_ins / "90-mine.conf").write_text('[Service]\nEnvironment="LD_PRELOAD=/opt/c.so"\n')
    enable("web", systemd, shim=shim)
    assert (f'Environment="LD_PRELOAD=/opt/c.so {shim}" "GODEBUG=multipathtcp=1"'
            in (drop_ins / "mptcpize.conf").read_text())


def test_unit_environment_is_read_as_systemd_reads_unit_files(tmp_path: Path) -> None:
    unit = tmp_path / "web.service"
    unit.write_text("[Unit]\nEnvironment=LD_PRELOAD=/not/service.so\n"
                    "[Service]\n# Environment=LD_PRELOAD=/commented.so\n"
                    "Environment=A=1 \\\n"
                    "; a comment inside the continued line\n"
                    '  "LD_PRELOAD=/a b/x.so" GODEBUG=p=100%%\n')
    assert unit_environment([unit, tmp_path / "gone.conf"]) == {
        "LD_PRELOAD": "/a b/x.so", "GODEBUG": "p=100%"}
    # A comment ending in a backslash continues nothing.
    unit.write_text("[Service]\n# see C:\\\nEnvironment=LD_PRELOAD=/usr/lib/libfoo.so\n")
    assert unit_environment([unit]) == {"LD_PRELOAD": "/usr/lib/libfoo.so"}
    unit.write_text("[Service]\nEnvironment=LD_PRELOAD=/lib/%i.so\n")
    with pytest.raises(MptcpizeError, match="LD_PRELOAD uses a systemd specifier"):
        unit_environment([unit])


def test_an_environment_file_overriding_the_drop_in_is_warned_about(
        tmp_path: Path, shim: Path) -> None:
    overriding = tmp_path / "web.env"
    overriding.write_text("# defaults\nLD_PRELOAD=/usr/lib/c.so\nexport GODEBUG=x=1\n")
    harmless = tmp_path / "ok.env"
    harmless.write_text(f"LD_PRELOAD={shim}\nGODEBUG=multipathtcp=1\nOTHER=1\n")
    files = (str(overriding), str(harmless), str(tmp_path / "absent.env"))
    warnings = environment_file_warnings(files, str(shim))
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{overriding} (EnvironmentFile=) sets LD_PRELOAD")
    assert f"add {shim} to it there" in warnings[0]
    assert "sets GODEBUG" in warnings[1] and "add multipathtcp=1" in warnings[1]
    # enable still writes its drop-in, and says what will undo it.
    said: list[str] = []
    systemd = FakeSystemd(tmp_path, environment_files=(str(overriding),))
    assert "MPTCP enabled" in enable("web", systemd, shim=shim, warn=said.append)
    assert said == warnings


def test_disable_removes_only_its_own_drop_in_and_keeps_the_others(
        tmp_path: Path, shim: Path) -> None:
    systemd = FakeSystemd(tmp_path)
    enable("web", systemd, shim=shim)
    other = tmp_path / "web.service.d" / "limits.conf"
    other.write_text("[Service]\nLimitNOFILE=4096\n")
    systemd.calls.clear()
    assert "MPTCP disabled" in disable("web", systemd)
    assert not (tmp_path / "web.service.d" / "mptcpize.conf").exists()
    assert other.exists()
    assert systemd.calls == ["daemon-reload", "try-restart web.service"]
    assert "was not enabled" in disable("web", systemd)


def test_run_without_the_shim_or_the_command_fails_clearly(
        tmp_path: Path, shim: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command(["true"], shim=tmp_path / "missing.so") == 69
    assert "missing.so is missing" in capsys.readouterr().err
    assert run_command(["no-such-command-xyz"], shim=shim) == 127
    assert "no-such-command-xyz: command not found" in capsys.readouterr().err
    assert main(["mptcpize", "run"]) == 64
