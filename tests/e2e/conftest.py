"""Fixtures of the end-to-end tests: a booted Debian 12 container with
systemd as PID 1 and this project's source tree in it."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import pytest
from e2e_harness import (
    CACHE_DIR,
    PROJECT,
    SOURCE_INSIDE,
    WHEELHOUSE_INSIDE,
    Container,
    StepLog,
    Unavailable,
    copy_source_tree,
    ensure_rootfs,
    ensure_wheelhouse,
    unavailable_reason,
)


@pytest.fixture(scope="module")
def steps(request: pytest.FixtureRequest) -> Iterator[StepLog]:
    """steps: the live step log of one e2e module; module scope; prints the
    timing table at the end."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:
        # Live, past pytest's output capture: the CI log shows each step as it runs.
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            if reporter is not None:
                reporter.write_line(line)
            else:  # pragma: no cover - pytest always has one unless disabled
                print(line, file=sys.__stderr__, flush=True)

    log = StepLog(write)
    yield log
    if log.timings:
        write(log.summary())


@pytest.fixture(scope="module")
def machine(steps: StepLog, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """machine: a freshly booted container (Debian 12, systemd as PID 1, its
    own network namespace) with the source tree at /root/mptcpd-py and the
    wheelhouse at /mnt/wheelhouse; module scope; powered off at teardown.
    Skips, with the reason, where this machine cannot boot it."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"cannot boot a systemd container here: {reason}")
    try:
        with steps.step("rootfs: Debian 12 + systemd"):
            rootfs, cached = ensure_rootfs(steps.note)
            steps.note(f"{'cached' if cached else 'built'}: {rootfs}")
    except Unavailable as exc:
        pytest.skip(f"cannot boot a systemd container here: {exc}")
    with steps.step("wheelhouse: runtime dependencies"):
        wheels, cached = ensure_wheelhouse(PROJECT, steps.note)
        steps.note(f"{'cached' if cached else 'built'}: {wheels}")
    work = tmp_path_factory.mktemp("e2e")
    source = work / "mptcpd-py"
    with steps.step("copy the source tree"):
        copy_source_tree(PROJECT, source)
    container = Container(rootfs, f"mptcpdpy-e2e-{os.getpid()}", work / "console.log",
                          binds=[(source, SOURCE_INSIDE, False),
                                 (wheels, WHEELHOUSE_INSIDE, True)])
    try:
        with steps.step("boot (systemd-nspawn --boot, --volatile=overlay)"):
            try:
                container.boot()
            except Unavailable as exc:
                pytest.skip(f"cannot boot a systemd container here: {exc}")
            steps.note(f"{container.name}: leader pid {container.leader}, "
                       f"{container.run(['systemctl', '--version']).stdout.splitlines()[0]}")
        yield container
    finally:
        with steps.step("power off"):
            container.stop()
        steps.note(f"cache: {CACHE_DIR}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """On a failure, the report carries the container's journal of mptcpd-py."""
    report = yield
    if report.failed and call.when == "call":
        funcargs = getattr(item, "funcargs", {})
        for value in funcargs.values():
            if isinstance(value, Container) and value.leader:
                with contextlib.suppress(Exception):
                    out = value.run(["journalctl", "--no-pager", "-n", "80", "-u",
                                     "mptcpd-py.service"], check=False).stdout
                    report.sections.append(("journalctl -u mptcpd-py (last 80)", out))
                break
    return report
