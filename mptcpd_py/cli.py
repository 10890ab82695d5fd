"""``mptcpd-py``: run, check-config, ctl, mptcpize, demo.

Exit codes (sysexits): 0 ok, 1 runtime failure, 64 usage error,
69 MPTCP unavailable, 77 permission denied, 78 configuration error.
Errors are one line; tracebacks only with ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import NoReturn

from mptcpd_py import __version__
from mptcpd_py.errors import ConfigError, MptcpdError

EX_USAGE = 64
EX_CONFIG = 78


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EX_USAGE)


def build_parser() -> Parser:
    parser = Parser(prog="mptcpd-py", description="Multipath TCP path-manager daemon.")
    parser.add_argument("--version", action="version", version=f"mptcpd-py {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    run = sub.add_parser("run", help="run the daemon in the foreground (systemd Type=notify)")
    run.add_argument("-c", "--config", metavar="PATH",
                     help="configuration file (default /etc/mptcpd-py/mptcpd.toml, or the "
                          "built-in defaults when that file does not exist)")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    run.add_argument("--log-format", choices=("auto", "journal", "json", "console"))

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("path", nargs="?", metavar="PATH",
                       help="file to check (default /etc/mptcpd-py/mptcpd.toml)")
    check.add_argument("--schema", action="store_true",
                       help="print every key (daemon and plugins) as Markdown and exit")

    from mptcpd_py.ctl import add_ctl_parser  # noqa: PLC0415

    add_ctl_parser(sub)

    from mptcpd_py.mptcpize import add_mptcpize_parser  # noqa: PLC0415

    add_mptcpize_parser(sub)

    demo = sub.add_parser("demo", help="the demo: two paths in network namespaces")
    demo.add_argument("--rate", type=float, default=50.0, help="Mbit/s per path (default 50)")
    demo.add_argument("--seconds", type=float, default=5.0,
                      help="length of each transfer phase (default 5)")
    demo.add_argument("--summary-json", metavar="PATH",
                      help="also write the phases' figures as JSON to PATH")
    return parser


def cmd_check_config(path: str | None, schema: bool) -> int:
    from mptcpd_py.ctl import silence_stdout  # noqa: PLC0415

    try:
        return print_schema(path) if schema else check_config(path)
    except BrokenPipeError:  # `check-config --schema | head`
        silence_stdout()
        return 0


def print_schema(path: str | None) -> int:
    """Every key, the plugins' included: those the file's plugin_dirs hold.
    The file is not validated: its schema is what helps fix a broken one."""
    from mptcpd_py.config import LIMITS, SECTIONS  # noqa: PLC0415
    from mptcpd_py.daemon import plugin_dirs_of  # noqa: PLC0415
    from mptcpd_py.loader import discover_plugins  # noqa: PLC0415
    from mptcpd_py.schema import render_markdown  # noqa: PLC0415

    for name, section in SECTIONS.items():
        print(render_markdown(section, name))
        if name == "kernel":
            print(render_markdown(LIMITS, "kernel.limits"))
    for name, found in sorted(discover_plugins(plugin_dirs_of(path)).available.items()):
        print(render_markdown(found.schema, f"plugins.{name}"))
    sys.stdout.flush()  # a closed pipe shows here, not at exit
    return 0


def check_config(path: str | None) -> int:
    from mptcpd_py.daemon import load_everything  # noqa: PLC0415
    from mptcpd_py.plugin import idle_plugins_warnings  # noqa: PLC0415

    try:
        config, available, problems = load_everything(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EX_CONFIG
    enabled_classes = [available[name].cls for name in config.daemon.plugins
                       if name in available]
    problems += idle_plugins_warnings(config.kernel.path_manager, enabled_classes,
                                      [found.cls for found in available.values()])
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    enabled = ", ".join(config.daemon.plugins) or "none"
    print(f"{config.path}: OK (plugins: {enabled})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "log_level", None) == "debug"
    try:
        if args.command == "run":
            from mptcpd_py.daemon import Daemon  # noqa: PLC0415

            daemon = Daemon(args.config, log_level=args.log_level, log_format=args.log_format)
            return asyncio.run(daemon.run())
        if args.command == "check-config":
            return cmd_check_config(args.path, args.schema)
        if args.command == "ctl":
            from mptcpd_py.ctl import run_ctl  # noqa: PLC0415

            return run_ctl(args)
        if args.command == "mptcpize":
            from mptcpd_py.mptcpize import run_mptcpize  # noqa: PLC0415

            return run_mptcpize(args)
        if args.command == "demo":
            from mptcpd_py.demo import run_demo  # noqa: PLC0415

            code: int = run_demo(rate=args.rate, seconds=args.seconds,
                                 summary_path=args.summary_json)
            return code
    except KeyboardInterrupt:
        return 130
    except MptcpdError as exc:
        if debug:
            raise
        print(f"mptcpd-py: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if debug:
            raise
        print(f"mptcpd-py: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return EX_USAGE
