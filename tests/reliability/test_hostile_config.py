"""Hostile configuration: hypothesis writes thousands of invalid or odd
files (wrong types, unknown keys and sections, bad globs, huge and
non-finite numbers, control characters, bad UTF-8, broken TOML) and both
``check-config`` and ``run`` answer each with exit 78 and one line per
problem naming the file, the line and the key, or accept it; never a
traceback, never a hang, never a multi-line or terminal-garbling message.

Most examples go through the same functions the commands call, in
process; a sample goes through the real ``mptcpd-py`` executable, and so
do the files no generator makes (a directory, an unreadable file, a
symlink loop, a huge file)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_lab import figures

from mptcpd_py.cli import cmd_check_config
from mptcpd_py.config import LIMITS, SECTIONS
from mptcpd_py.daemon import Daemon, load_everything
from mptcpd_py.lab import Lab, Netns
from mptcpd_py.loader import discover
from mptcpd_py.logging import configure

EX_CONFIG = 78
EXAMPLES = 1000
LONG_EXAMPLES = 10_000
SUBPROCESS_EXAMPLES = 12

# ------------------------------------------------------------------ TOML text

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_string(text: str) -> str:
    out = ['"']
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or c == "\x7f":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out) + '"'


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(doc: dict[str, Any]) -> str:
    """Top-level scalars first, then one [table] per dict (sub-tables inline)."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items()
             if not isinstance(v, dict)]
    for name, table in doc.items():
        if isinstance(table, dict):
            header = ".".join(toml_key(part) for part in name.split("\x00"))
            lines.append(f"[{header}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ strategies

ODD_TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", "eth[0", "eth]", "[!]", "*", "/etc", "/", "a/b", "eth 0",
                     "x" * 300, "\n", "\r\n", "\x00", "\x1b[31mred", "\u202eevil", "\u2028",
                     "127.0.0.1:0", "[::1]:99999", "::1:80", "kernel", "userspace",
                     "debug", "remove", "keep", "signal", "fullmesh", "root", "[[", "]]",
                     "/run/\x00x", "/tmp/../etc", "eth[z-a]", "é"]),
)
HUGE_INT = st.sampled_from([0, -1, 2**31, 2**32, 2**63, -(2**63) - 1, 2**64, 10**30, 10**300])
ODD_FLOAT = st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e308, math.inf, -math.inf, math.nan,
                             0.05, 0.049, 86400.0, 86401.0])
SCALAR = st.one_of(st.booleans(), st.integers(), HUGE_INT, st.floats(), ODD_FLOAT, ODD_TEXT,
                   st.datetimes(), st.dates(), st.times())
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(ODD_TEXT, inner, max_size=3)), max_leaves=8)


def _known_keys() -> dict[str, list[str]]:
    keys = {name: list(schema.options) for name, schema in SECTIONS.items()}
    keys["kernel"].append("limits")
    available, _ = discover([])
    for name, found in available.items():
        keys[f"plugins\x00{name}"] = list(found.schema.options)
    return keys


KNOWN = _known_keys()
SECTION_NAMES = st.one_of(st.sampled_from(sorted(KNOWN)), ODD_TEXT,
                          st.sampled_from(["plugins\x00nope", "plugins", "kernel\x00limits",
                                           "daemon\x00daemon", "metrics\x00x\x00y"]))


@st.composite
def tables(draw: Any, section: str) -> dict[str, Any]:
    names = KNOWN.get(section, [])
    key = st.sampled_from(names) if names else ODD_TEXT
    if section == "kernel\x00limits":
        key = st.sampled_from(list(LIMITS.options))
    keys = draw(st.lists(st.one_of(key, key, ODD_TEXT), max_size=5, unique=True))
    return {k: draw(VALUE) for k in keys}


@st.composite
def documents(draw: Any) -> str:
    sections = draw(st.lists(SECTION_NAMES, max_size=4, unique=True))
    doc: dict[str, Any] = {s: draw(tables(s)) for s in sections}
    if draw(st.booleans()):
        doc.update(draw(st.dictionaries(ODD_TEXT, SCALAR, max_size=2)))
    return toml_document(doc)


@st.composite
def config_bytes(draw: Any) -> bytes:
    """A TOML document, sometimes damaged on the way to disk."""
    raw = draw(documents()).encode("utf-8")
    damage = draw(st.sampled_from(["none", "none", "none", "bytes", "truncate", "duplicate",
                                   "garbage", "comment"]))
    if damage == "bytes":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    elif damage == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif damage == "duplicate":
        raw = raw + raw
    elif damage == "garbage":
        raw = draw(st.binary(max_size=64))
    elif damage == "comment":
        raw = b"# only a comment\n" * draw(st.integers(0, 3))
    return raw


# ------------------------------------------------------------------ checks

def problem_line(path: str) -> re.Pattern[str]:
    """PATH:LINE: key: what is wrong (key possibly quoted, problem free text)."""
    return re.compile(rf"^{re.escape(path)}:\d+: [^ ].*: \S.*$")


def assert_problem_lines(lines: list[str], path: str) -> None:
    assert lines, "exit 78 without saying why"
    pattern = problem_line(path)
    for line in lines:
        assert pattern.match(line), f"not PATH:LINE: key: problem: {line!r}"
        assert line.isprintable(), f"control or invisible characters: {line!r}"
        assert "Traceback" not in line


def check_config_in_process(path: str) -> tuple[int, list[str]]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cmd_check_config(path, False)
    return code, err.getvalue().splitlines()


class StartedAnyway(AssertionError):
    pass


class RefusingDaemon(Daemon):
    """``run`` exactly as the command does, but a config that gets past the
    checks stops here, before the daemon touches anything (this process
    lives in the host's network namespace)."""

    def _check_peers(self) -> None:
        raise StartedAnyway("run accepted a configuration check-config refused")


def run_in_process(path: str) -> tuple[int, list[str]]:
    """``mptcpd-py run`` up to where a configuration is refused."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = asyncio.run(RefusingDaemon(path, log_format="json").run())
    return code, err.getvalue().splitlines()


def assert_valid_config_is_usable(path: str) -> None:
    """What check-config accepts must not fail later for the same reason:
    paths the daemon will open are absolute and free of NUL."""
    config = load_everything(path)[0]
    for p in (config.daemon.state_dir, *config.daemon.plugin_dirs):
        assert os.path.isabs(p) and "\x00" not in p, p


class Tally:
    examples = 0
    refused = 0


@pytest.fixture(scope="module", autouse=True)
def _restore_logging_and_report() -> Iterator[None]:
    """run_in_process configures logging onto a captured stream: undo it;
    and say how many examples ran (``pytest -rP`` shows it)."""
    yield
    configure("info", "console", sys.stderr)
    if Tally.examples:
        figures("hostile_config", examples=Tally.examples, refused=Tally.refused)


def hostile_config_property(raw: bytes, workdir: str) -> None:
    path = os.path.join(workdir, "mptcpd.toml")
    with open(path, "wb") as f:
        f.write(raw)
    code, lines = check_config_in_process(path)
    Tally.examples += 1
    assert code in (0, EX_CONFIG), (code, lines)
    if code == 0:
        assert_valid_config_is_usable(path)
        return
    Tally.refused += 1
    assert_problem_lines(lines, path)
    run_code, run_lines = run_in_process(path)
    assert run_code == EX_CONFIG, run_lines
    # One log line per problem, each carrying the same text as check-config.
    assert len(run_lines) == len(lines), run_lines
    for problem, logged in zip(lines, run_lines, strict=True):
        entry = json.loads(logged)
        assert (entry["event"], entry["error"]) == ("configuration error", problem)


@pytest.fixture(scope="module")
def workdir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="hostile-config-") as path:
        yield path


SETTINGS = {"deadline": None, "database": None, "derandomize": False,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture]}


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(raw=config_bytes())
def test_hostile_configs_are_refused_with_one_line_per_problem(raw: bytes, workdir: str) -> None:
    hostile_config_property(raw, workdir)


@pytest.mark.long
@pytest.mark.timeout(1800)
@settings(max_examples=LONG_EXAMPLES, **SETTINGS)
@given(raw=config_bytes())
def test_ten_thousand_hostile_configs_are_refused_with_one_line_per_problem(
        raw: bytes, workdir: str) -> None:
    hostile_config_property(raw, workdir)


# ------------------------------------------------------------------ the real executable

def executable() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "mptcpd-py")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "mptcpd_py"]


def check_config_command(path: str, *, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_nobody else []
    return subprocess.run([*prefix, *executable(), "check-config", path], capture_output=True,
                          text=True, timeout=30)


def run_command(ns: Netns, path: str, *, as_nobody: bool = False
                ) -> subprocess.CompletedProcess[str]:
    """``mptcpd-py run`` inside a lab namespace (never the host's), only
    ever given a configuration check-config refused."""
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_nobody else []
    return subprocess.run(["ip", "netns", "exec", ns.name, *prefix, *executable(), "run",
                           "-c", path, "--log-format", "json"], capture_output=True, text=True,
                          timeout=30)


def assert_refused_by_both_commands(ns: Netns, path: str, expected: str = "", *,
                                    as_nobody: bool = False) -> list[str]:
    checked = check_config_command(path, as_nobody=as_nobody)
    assert checked.returncode == EX_CONFIG, checked
    lines = checked.stderr.splitlines()
    assert_problem_lines(lines, path)
    assert checked.stdout == ""
    if expected:
        assert any(expected in line for line in lines), lines
    ran = run_command(ns, path, as_nobody=as_nobody)
    assert ran.returncode == EX_CONFIG, ran
    assert "Traceback" not in ran.stderr + ran.stdout
    logged = [json.loads(line) for line in ran.stderr.splitlines()]
    assert [(e["event"], e["error"]) for e in logged] == \
        [("configuration error", line) for line in lines]
    return lines


@pytest.fixture
def box(lab: Lab) -> Netns:
    """box: an empty lab namespace for ``run``; depends on ``lab``."""
    return lab.netns("cfg")


def test_files_no_generator_makes_are_refused_by_both_executables(
        box: Netns, tmp_path: Path) -> None:
    def write(name: str, data: bytes, mode: int = 0o644) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        os.chmod(path, mode)
        return str(path)

    loop = tmp_path / "loop.toml"
    os.symlink(loop, loop)
    os.chmod(tmp_path, 0o755)  # nobody may look in, not read the 0600 file
    cases = {
        write("empty.toml", b""): "file: is empty",
        write("blank.toml", b" \n\t\n"): "file: is empty",
        str(tmp_path / "missing.toml"): "file: cannot read: No such file or directory",
        str(tmp_path): "file: is a directory, not a configuration file",
        str(loop): "file: cannot read: Too many levels of symbolic links",
        write("latin1.toml", b'[daemon]\nlog_level = "d\xe9bug"\n'): ":2: file: not valid UTF-8",
        write("huge.toml", b"#" * (4 * 1024 * 1024 + 1)): "file: larger than 4 MiB",
        write("nul.toml", b'[daemon]\nstate_dir = "/run/x\\u0000y"\n'):
            ":2: daemon.state_dir: a path cannot contain a NUL character",
        write("deep.toml", b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n"): ":1: ",
        write("bigint.toml", b"[routing]\ntable_base = " + b"9" * 5000 + b"\n"): ":",
    }
    for path, expected in cases.items():
        assert_refused_by_both_commands(box, path, expected)
    unreadable = write("secret.toml", b"[daemon]\n", mode=0o600)
    assert_refused_by_both_commands(box, unreadable, "file: cannot read: Permission denied",
                                    as_nobody=True)


def test_comment_only_file_is_the_defaults_for_check_config() -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write("# nothing here\n\n# nor here\n")
        f.flush()
        checked = check_config_command(f.name)
    assert checked.returncode == 0, checked
    assert checked.stdout.strip() == f"{f.name}: OK (plugins: addr_adv, backup_cellular)"


@settings(max_examples=SUBPROCESS_EXAMPLES, **SETTINGS)
@given(raw=config_bytes())
def test_a_sample_of_hostile_configs_through_the_real_executable(
        raw: bytes, box: Netns, workdir: str) -> None:
    path = os.path.join(workdir, "sample.toml")
    with open(path, "wb") as f:
        f.write(raw)
    in_process, _ = check_config_in_process(path)
    if in_process == 0:
        checked = check_config_command(path)
        assert checked.returncode == 0 and "Traceback" not in checked.stderr, checked
        return
    assert_refused_by_both_commands(box, path)
