"""``python -m bench``: mptcpd-py and the C mptcpd, side by side.

Each section builds its own network namespaces and runs both daemons in
turn (mptcpd only when the Debian packages ``mptcpd`` and
``mptcpd-plugins`` are installed); the table goes to the terminal and to
``bench/RESULTS.md``, the raw figures to ``bench/out/results.json``.
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench import endpoints, paths, startup, userspace
from bench.daemons import mptcpd_available
from bench.plan import FULL, QUICK
from bench.report import Context, Row, Summary, table_lines, write_markdown
from mptcpd_py import __version__
from mptcpd_py.lab import LabError, cleanup_stale_namespaces

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SECTIONS = ("endpoints", "startup", "userspace", "paths")


def mptcpd_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "mptcpd"],
                             capture_output=True, text=True, check=False, timeout=10)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def compile_sources() -> None:
    """Bytecode for the daemon, as any installed package has: without it every
    start would compile the sources again (PYTHONDONTWRITEBYTECODE, a
    read-only tree)."""
    for name in ("mptcpd_py", "plugins"):
        compileall.compile_dir(os.path.join(REPO, name), quiet=1)


def tmpfs_workdir() -> str:
    """The daemons' state and logs on tmpfs, where /run/mptcpd-py is on a real
    system (here /run may be a disk)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    return tempfile.mkdtemp(prefix="mptcpd-bench-", dir=base)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny configuration (seconds): checks the harness, not the "
                             "daemons")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--no-mptcpd", action="store_true", help="skip the C mptcpd")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"),
                        help="Markdown table (default bench/RESULTS.md)")
    parser.add_argument("--json", default=os.path.join(HERE, "out", "results.json"),
                        help="raw figures (default bench/out/results.json)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the daemons' logs and state (printed path)")
    return parser.parse_args(argv)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def jsonable(value: Any) -> Any:
    if isinstance(value, Summary):
        return dataclasses.asdict(value)
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("bench: run as root (network namespaces)", file=sys.stderr)
        return 77
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        print(f"bench: unknown section(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 64
    plan = QUICK if args.quick else FULL
    with_c = not args.no_mptcpd and mptcpd_available()
    versions = {"mptcpd-py": __version__}
    if with_c:
        versions["mptcpd"] = mptcpd_version()
    elif not args.no_mptcpd:
        log("mptcpd is not installed (Debian packages mptcpd, mptcpd-plugins): "
            "mptcpd-py only")
    cleanup_stale_namespaces()
    compile_sources()
    workdir = tmpfs_workdir()
    ctx = Context()
    rows: list[Row] = []
    started = time.monotonic()
    try:
        for section in sections:
            load = ctx.note_load(section)
            log(f"== {section} (load average {load})")
            module = {"endpoints": endpoints, "startup": startup, "userspace": userspace,
                      "paths": paths}[section]
            rows += module.run(plan, workdir, with_c=with_c, log=log)
    except (LabError, TimeoutError, OSError) as exc:
        log(f"bench failed: {exc}")
        return 1
    finally:
        if args.keep:
            log(f"logs and state kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    print()
    print("\n".join(table_lines(rows, markdown=False)))
    command = "python -m bench" + (" " + " ".join(sys.argv[1:]) if argv is None and
                                   sys.argv[1:] else "")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_markdown(args.out, rows, ctx, command=command, versions=versions, elapsed=elapsed)
    with open(args.json, "w") as f:
        json.dump({"versions": versions, "loads": ctx.loads, "elapsed": elapsed,
                   "rows": [{**dataclasses.asdict(r), "values": {k: jsonable(v) for k, v in
                                                                r.values.items()}}
                            for r in rows]}, f, indent=1, default=str)
    missed = [r for r in rows if r.met is False]
    log(f"done in {elapsed:.0f} s; {len(missed)} target(s) not met; table in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
