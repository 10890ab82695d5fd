"""``mptcpd-py ctl``: talk to a running daemon over its control socket.

Human tables by default, ``--json`` for scripts (``monitor --json`` prints
one JSON object per line). Exit codes: 0 ok, 1 the daemon answered with an
error or did not answer, 64 usage, 69 the daemon is not running, 77
permission denied, 78 ``reload`` refused because of a configuration error.

The client binds an abstract address of its own and connects to the
socket, so only the daemon can send to it; run it in the daemon's network
namespace (abstract unix addresses belong to one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import asyncio_dgram

from mptcpd_py.control import (
    CONFIG_ERROR,
    DEFAULT_SOCKET,
    KEEPALIVE,
    PERMISSION_DENIED,
    SOCKET_NAME,
    STOPPING,
    ProtocolError,
    Reassembler,
    encode_request,
    parse_message,
)

COMMANDS = ("status", "endpoints", "connections", "plugins", "limits", "reload", "monitor",
            "metrics")
EX_OK, EX_FAIL, EX_UNAVAILABLE, EX_NOPERM, EX_CONFIG = 0, 1, 69, 77, 78
DEFAULT_TIMEOUT = 10.0
RELOAD_TIMEOUT = 120.0


class CtlFailure(Exception):
    """Ends ``ctl`` with a one-line message and an exit code."""

    def __init__(self, message: str, code: int = EX_FAIL, details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


def default_socket() -> str:
    """``state_dir/control`` of the default config file (or the built-in default)."""
    from mptcpd_py.config import read_raw_daemon_section  # noqa: PLC0415

    state_dir = read_raw_daemon_section(None).get("state_dir")
    if isinstance(state_dir, str) and os.path.isabs(state_dir):
        return os.path.join(state_dir, SOCKET_NAME)
    return DEFAULT_SOCKET


def add_ctl_parser(sub: Any) -> None:
    ctl = sub.add_parser(
        "ctl", help="query or steer a running daemon",
        description="Query or steer a running mptcpd-py over its control socket.")
    ctl.add_argument("--socket", metavar="PATH",
                     help=f"control socket (default: state_dir/{SOCKET_NAME} of "
                          f"/etc/mptcpd-py/mptcpd.toml, else {DEFAULT_SOCKET})")
    ctl.add_argument("--json", action="store_true", help="machine-readable output")
    ctl.add_argument("--timeout", type=float, metavar="SECONDS",
                     help=f"how long to wait for a reply (default {DEFAULT_TIMEOUT:g}, "
                          f"reload {RELOAD_TIMEOUT:g}; monitor: to its subscription)")
    ctl.add_argument("what", choices=COMMANDS, metavar="|".join(COMMANDS))


def run_ctl(args: argparse.Namespace) -> int:
    path = args.socket or default_socket()
    timeout = args.timeout if args.timeout is not None else \
        (RELOAD_TIMEOUT if args.what == "reload" else DEFAULT_TIMEOUT)
    if timeout <= 0:
        print("mptcpd-py ctl: --timeout must be positive", file=sys.stderr)
        return 64
    try:
        if args.what == "monitor":
            return asyncio.run(monitor(path, as_json=args.json, patience=timeout))
        result = asyncio.run(call(path, args.what, timeout))
    except CtlFailure as exc:
        print(f"mptcpd-py ctl: {exc}", file=sys.stderr)
        problems = (exc.details or {}).get("problems") if isinstance(exc.details, dict) else None
        for line in problems or ():
            print(line, file=sys.stderr)
        return exc.code
    try:
        if args.json:
            if args.what == "metrics":
                result = {"content_type": result.get("content_type"),
                          "metrics": parse_metrics(result.get("text", ""))}
            print(json.dumps(result, indent=2))
        else:
            print(RENDERERS[args.what](result), end="")
    except BrokenPipeError:  # `ctl ... | head`
        silence_stdout()
    return EX_OK



def silence_stdout() -> None:
    """The reader of our output went away: point stdout at /dev/null so
    the flush at exit does not complain."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# ---------------------------------------------------------------- talking


async def connect(path: str) -> Any:
    """A datagram client connected to the daemon's socket, with clear errors."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind("")  # autobind: an abstract address the daemon can answer to
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise CtlFailure(f"the daemon is not running (no control socket at {path})",
                         EX_UNAVAILABLE) from None
    except ConnectionRefusedError:
        sock.close()
        raise CtlFailure(f"the daemon is not running (nobody listens on {path})",
                         EX_UNAVAILABLE) from None
    except PermissionError:
        sock.close()
        raise CtlFailure(f"permission denied on {path}: the control socket is for root and "
                         "the daemon's control_group", EX_NOPERM) from None
    except OSError as exc:
        sock.close()
        raise CtlFailure(f"cannot reach the daemon at {path}: {exc.strerror or exc}",
                         EX_UNAVAILABLE) from None
    return await asyncio_dgram.from_socket(sock)


def _failure(error: Any) -> CtlFailure:
    if not isinstance(error, dict):
        return CtlFailure("the daemon answered with an unreadable error")
    code = str(error.get("code", ""))
    message = str(error.get("message", "error"))
    exit_code = {PERMISSION_DENIED: EX_NOPERM, CONFIG_ERROR: EX_CONFIG,
                 STOPPING: EX_UNAVAILABLE}.get(code, EX_FAIL)
    return CtlFailure(message, exit_code, error.get("details"))


async def _receive(client: Any, request_id: int, patience: float, what: str
                   ) -> dict[str, Any]:
    """The reply to ``request_id`` (reassembled), or CtlFailure after
    ``patience`` seconds."""
    reassembler = Reassembler()
    deadline = time.monotonic() + patience
    while True:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            data, _ = await asyncio.wait_for(client.recv(), remaining)
        except TimeoutError:
            raise CtlFailure(f"no reply from the daemon to {what} within {patience:g}s"
                             ) from None
        except (ConnectionError, asyncio_dgram.TransportClosed) as exc:
            raise CtlFailure(f"the daemon went away ({exc or 'socket closed'})",
                             EX_UNAVAILABLE) from None
        try:
            message = parse_message(data)
        except ProtocolError as exc:
            raise CtlFailure(str(exc)) from None
        if message.get("id") != request_id or "event" in message:
            continue
        try:
            reply = reassembler.feed(message)
        except ProtocolError as exc:
            raise CtlFailure(str(exc)) from None
        if reply is not None:
            return reply


async def call(path: str, command: str, patience: float = DEFAULT_TIMEOUT,
               args: dict[str, Any] | None = None) -> Any:
    """One request, its result (or CtlFailure)."""
    client = await connect(path)
    try:
        return await _ask(client, command, random.randrange(1, 2**31), patience, args)
    finally:
        client.close()


async def _ask(client: Any, command: str, request_id: int, patience: float,
               args: dict[str, Any] | None = None) -> Any:
    """Send one request on ``client`` and return its result (or CtlFailure)."""
    try:
        await client.send(encode_request(command, request_id, args))
    except (ConnectionError, OSError) as exc:
        raise CtlFailure(f"the daemon is not running ({exc.strerror or exc})",
                         EX_UNAVAILABLE) from None
    reply = await _receive(client, request_id, patience, command)
    if not reply.get("ok"):
        raise _failure(reply.get("error"))
    return reply.get("result")


async def monitor(path: str, *, as_json: bool = False,
                  out: Callable[[str], None] | None = None,
                  patience: float = DEFAULT_TIMEOUT) -> int:
    """Subscribe (waiting ``patience`` s for the reply), print events as they
    come, renew every KEEPALIVE seconds; SIGINT / SIGTERM unsubscribe and end
    with 0. Ends with 1 (69 at start) when the daemon goes away."""
    write = out or _print_line
    client = await connect(path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    request_id = random.randrange(1, 2**31)
    try:
        result = await _ask(client, "monitor", request_id, patience)
        keepalive = float((result or {}).get("keepalive", KEEPALIVE))
        if not as_json:
            write(f"monitoring mptcpd-py at {path} (Ctrl-C to stop)")
        code = await _stream(client, request_id, keepalive=keepalive, stop=stop, write=write,
                             as_json=as_json)
        with contextlib.suppress(Exception):
            await client.send(encode_request("unsubscribe", request_id))
        return code
    except CtlFailure as exc:
        print(f"mptcpd-py ctl: {exc}", file=sys.stderr)
        return exc.code
    finally:
        client.close()


async def _stream(client: Any, request_id: int, *, keepalive: float, stop: asyncio.Event,
                  write: Callable[[str], None], as_json: bool) -> int:
    stopping = asyncio.create_task(stop.wait())
    last_heard = time.monotonic()
    next_renewal = last_heard + keepalive
    try:
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_renewal:
                try:
                    await client.send(encode_request("monitor", request_id))
                except (ConnectionError, OSError, asyncio_dgram.TransportClosed):
                    print("mptcpd-py ctl: the daemon went away", file=sys.stderr)
                    return EX_FAIL
                next_renewal = now + keepalive
            if now - last_heard > 2 * keepalive + 1:
                print("mptcpd-py ctl: the daemon stopped answering", file=sys.stderr)
                return EX_FAIL
            receiving = asyncio.ensure_future(client.recv())
            done, _ = await asyncio.wait({receiving, stopping},
                                         timeout=max(0.05, next_renewal - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if receiving not in done:
                receiving.cancel()
                with contextlib.suppress(BaseException):
                    await receiving
                continue
            try:
                data, _ = receiving.result()
                message = parse_message(data)
            except (ConnectionError, asyncio_dgram.TransportClosed):
                print("mptcpd-py ctl: the daemon went away", file=sys.stderr)
                return EX_FAIL
            except ProtocolError:
                continue
            last_heard = time.monotonic()
            if message.get("id") != request_id:
                continue
            event = message.get("event")
            if not isinstance(event, dict):
                if message.get("ok") is False:  # a renewal refused (the daemon restarted?)
                    raise _failure(message.get("error"))
                continue
            try:
                write(json.dumps(event) if as_json else format_event(event))
            except BrokenPipeError:  # `ctl monitor | head`
                silence_stdout()
                return EX_OK
            if event.get("kind") == "stopping":
                return EX_OK
        return EX_OK
    finally:
        stopping.cancel()


def _print_line(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------- rendering


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart; the last column is not padded.
    None shows as "-" (no value), "" as a blank (same as above)."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row]
                                          for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [c.ljust(widths[i]) for i, c in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines) + "\n"


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _counts(mapping: dict[str, int]) -> str:
    if not mapping:
        return "none"
    return ", ".join(f"{key} {value}" for key, value in mapping.items())


def render_status(s: dict[str, Any]) -> str:
    now = time.time()
    counts = s.get("counts", {})
    ep = counts.get("endpoints", {})
    limits = s.get("limits")
    lines = [
        ("daemon", f"mptcpd-py {s.get('version')}, pid {s.get('pid')}, "
                   f"up {_ago(s.get('uptime', 0))}"),
        ("config", s.get("config")),
        ("path manager", f"{s.get('path_manager')}"
                         + ("" if s.get("mptcp_enabled") else " (MPTCP disabled)")),
        ("limits", f"subflows {limits['subflows']}, add_addr_accepted "
                   f"{limits['add_addr_accepted']}" if limits else "unknown"),
        ("endpoints", f"{ep.get('owned', 0)} owned, {ep.get('foreign', 0)} foreign, "
                      f"{ep.get('waiting', 0)} waiting for a slot"
                      + (f", {ep['missing']} missing" if ep.get("missing") else "")),
        ("connections", f"{counts.get('connections', 0)} "
                        f"({counts.get('subflows', 0)} subflows)"),
        ("plugins", ", ".join(f"{p['name']} ({p['state']}"
                              + (f", {p['failures']} failures" if p.get("failures") else "")
                              + ")" for p in s.get("plugins", [])) or "none"),
        ("events", f"{sum(s.get('events', {}).values())} "
                   f"({_counts(s.get('events', {}))})"),
        ("reconciles", f"{s.get('reconciles', 0)}; last full resync "
                       + (f"{_ago(now - s['last_resync'])} ago" if s.get("last_resync")
                          else "never")),
        ("resyncs", _counts(s.get("resyncs", {}))),
        ("kernel errors", _counts(s.get("kernel_errors", {}))),
        ("plugin failures", _counts(s.get("plugin_failures", {}))),
        ("last error", f"{s['last_error']['message']} "
                       f"({_ago(now - s['last_error']['time'])} ago)"
         if s.get("last_error") else "none"),
    ]
    latency = s.get("latency", {})
    if latency.get("window"):
        lines.append(("latency", f"p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms "
                                 f"(last {latency['window']} of {latency['observed']})"))
    lines.append(("monitor", f"{counts.get('monitor_clients', 0)} clients"))
    lines.append(("control", f"{s.get('control_socket')} (group "
                             f"{s.get('control_group') or 'root only'})"))
    metrics = (f"http://{s['metrics_listen']}/metrics" if s.get("metrics_listen")
               else ("error: " + s["metrics_error"] if s.get("metrics_error") else "off"))
    lines.append(("metrics", metrics))
    for part, error in (s.get("read_errors") or {}).items():
        lines.append((f"{part} unreadable", error))
    width = max(len(k) for k, _ in lines) + 1
    return "".join(f"{(k + ':').ljust(width)} {v}\n" for k, v in lines)


def render_endpoints(result: dict[str, Any]) -> str:
    rows = result.get("endpoints", [])
    if not rows:
        return "no endpoints\n"
    return table(("ID", "ADDRESS", "PORT", "FLAGS", "DEV", "STATE", "PLUGIN", "WHY"), [
        (r["id"], r["address"], r["port"] or None, ",".join(r["flags"]) or None,
         r["ifname"] or None, r["state"], r["plugin"] or None, r["reason"] or None)
        for r in rows])


def render_connections(result: dict[str, Any]) -> str:
    conns = result.get("connections", [])
    if not conns:
        return "no MPTCP connections\n"
    rows = []
    for conn in conns:
        first = True
        for sub in conn["subflows"]:
            rows.append((f"{conn['token']:08x}" if first else "",
                         conn["side"] if first else "",
                         _endpoint(sub["local"], sub["local_port"]),
                         _endpoint(sub["remote"], sub["remote_port"]),
                         f"{sub['local_id']}/{sub['remote_id']}", sub["ifname"] or None,
                         "yes" if sub["backup"] else "no"))
            first = False
    subflows = sum(len(c["subflows"]) for c in conns)
    return table(("TOKEN", "SIDE", "LOCAL", "REMOTE", "IDS", "DEV", "BACKUP"), rows) + \
        f"{len(conns)} connection{'s' * (len(conns) != 1)}, " \
        f"{subflows} subflow{'s' * (subflows != 1)}\n"


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def render_plugins(result: dict[str, Any]) -> str:
    rows = result.get("plugins", [])
    text = table(("NAME", "STATE", "CALLS", "FAILURES", "HOOKS", "ORIGIN", "LAST ERROR"), [
        (r["name"], r["state"] + (f" ({r['disabled_reason']})" if r["disabled_reason"]
                                  and r["state"] != "active" else ""),
         r["calls"], f"{r['failures']}/{r['total_failures']}", ",".join(r["hooks"]) or None,
         r["origin"] or None, r["last_error"] or None) for r in rows]) \
        if rows else "no plugins enabled\n"
    for problem in result.get("problems", []):
        text += f"problem: {problem}\n"
    return text


def render_limits(result: dict[str, Any]) -> str:
    return table(("LIMIT", "KERNEL", "CONFIGURED", "BEFORE MPTCPD-PY"), [
        (r["name"], r["kernel"], "leave as is" if r["configured"] is None else r["configured"],
         "unchanged" if r["before"] is None else r["before"])
        for r in result.get("limits", [])]) + \
        f"(the kernel allows at most {result.get('max', 8)} each)\n"


def render_reload(result: dict[str, Any]) -> str:
    plugins = ", ".join(result.get("plugins", [])) or "none"
    return f"reloaded {result.get('config')} (plugins: {plugins})\n"


def render_metrics(result: dict[str, Any]) -> str:
    return str(result.get("text", ""))


RENDERERS: dict[str, Callable[[Any], str]] = {
    "status": render_status, "endpoints": render_endpoints,
    "connections": render_connections, "plugins": render_plugins,
    "limits": render_limits, "reload": render_reload, "metrics": render_metrics,
}


def parse_metrics(text: str) -> dict[str, list[dict[str, Any]]]:
    """The exposition as {sample name: [{"labels": {...}, "value": v}]}."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    out: dict[str, list[dict[str, Any]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append({"labels": dict(sample.labels),
                                                    "value": sample.value})
    return out


def _token(value: Any) -> str:
    return f"{value:08x}" if isinstance(value, int) else str(value)


def _by_whom_and_why(event: dict[str, Any]) -> str:
    text = f" by {event['plugin']}" if event.get("plugin") else ""
    return text + (f": {event['reason']}" if event.get("reason") else "")


def format_event(event: dict[str, Any]) -> str:
    """One monitor line: time, kind, what happened and why."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time", 0)))
    stamp += f".{int((event.get('time', 0) % 1) * 1000):03d}"
    kind = str(event.get("kind", "?"))
    e = event
    if kind == "address":
        text = f"{e.get('action')} {e.get('addr')} dev {e.get('ifname') or '?'}"
    elif kind == "link":
        state = "up" if e.get("running") else ("down" if not e.get("up") else "no carrier")
        text = f"{e.get('ifname')} {e.get('action')}: {state}"
    elif kind == "route":
        text = f"{e.get('action')} {e.get('dst')} via {e.get('gateway')} " \
               f"dev {e.get('ifname') or '?'}"
    elif kind == "endpoint":
        ident = f" id {e['endpoint_id']}" if e.get("endpoint_id") is not None else ""
        text = f"{e.get('action')} {e.get('addr')}{ident} {e.get('flags')}"
        if e.get("ifname"):
            text += f" dev {e['ifname']}"
        text += _by_whom_and_why(e)
        if e.get("trigger"):
            text += f" (after {e['trigger']})"
        if e.get("error"):
            text += f" -> {'waiting: ' if e.get('action') == 'wait' else 'failed: '}" \
                    f"{e['error']}"
    elif kind == "mptcp":
        name = str(e.get("event", "?"))
        text = f"{name} token {_token(e.get('token'))}"
        if e.get("saddr"):
            text += f" {_endpoint(str(e['saddr']), int(e.get('sport') or 0))} -> " \
                    f"{_endpoint(str(e.get('daddr')), int(e.get('dport') or 0))}"
        if "local_id" in e:
            text += f" ids {e.get('local_id')}/{e.get('remote_id')}"
        elif "remote_id" in e:
            text += f" remote id {e.get('remote_id')}"
        if e.get("backup"):
            text += " backup"
        if e.get("ifname"):
            text += f" dev {e['ifname']}"
        if e.get("error"):
            text += f" error {e['error']}"
    elif kind == "action":
        text = f"{e.get('action')} token {_token(e.get('token'))} {e.get('local')}"
        if e.get("remote") and e.get("remote") != "None":
            text += f" -> {e['remote']}"
        text += _by_whom_and_why(e)
        if e.get("error"):
            text += f" -> failed: {e['error']}"
    elif kind == "plugin":
        text = f"{e.get('plugin')} {e.get('action')}: {e.get('error')}"
        if e.get("enabled") is False:
            text += " (disabled)"
    elif kind == "resync":
        text = f"{e.get('source')} events lost ({e.get('reason')}): re-reading the kernel"
    elif kind == "lost":
        text = f"{e.get('count')} events not shown (this client did not keep up)"
    elif kind == "stopping":
        text = f"{e.get('reason') or 'the daemon is stopping'}: end of the stream"
    else:
        text = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("time", "kind"))
    return f"{stamp} {kind:<8} {text}"
