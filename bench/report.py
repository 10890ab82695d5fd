"""Summaries (median / p95 / max), result rows, targets, and the table:
printed to the terminal and written as Markdown to ``bench/RESULTS.md``."""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PY, C, FLOOR = "mptcpd-py", "mptcpd", "floor"


@dataclass(frozen=True)
class Summary:
    """median / p95 / max of repeated measurements (nearest-rank p95)."""

    n: int
    median: float
    p95: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary | None:
        if not values:
            return None
        ordered = sorted(values)
        n = len(ordered)
        mid = n // 2
        median = ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        p95 = ordered[max(0, math.ceil(0.95 * n) - 1)]
        return cls(n, median, p95, ordered[-1])

    def scaled(self, factor: float) -> Summary:
        return Summary(self.n, self.median * factor, self.p95 * factor, self.max * factor)


Value = Summary | float | int | str | None


def fmt(value: Value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, Summary):
        return f"{value.median:.{digits}f} / {value.p95:.{digits}f} / {value.max:.{digits}f}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def central(value: Value) -> float | None:
    if isinstance(value, Summary):
        return value.median
    if isinstance(value, int | float):
        return float(value)
    return None


@dataclass
class Row:
    """One line of the table: a metric for each daemon (and the kernel floor)."""

    section: str
    metric: str
    unit: str
    values: dict[str, Value] = field(default_factory=dict)
    target: str = ""
    met: bool | None = None  # None: no target, or not measurable here
    digits: int = 2
    note: str = ""

    def ratio(self) -> str:
        """mptcpd-py / mptcpd of the central values (median for summaries)."""
        py, c = central(self.values.get(PY)), central(self.values.get(C))
        if py is None or c is None or c == 0:
            return "-"
        return f"{py / c:.2f}x"

    def check(self, predicate: Callable[[], bool], target: str) -> Row:
        """Set the target text and whether mptcpd-py meets it (None when a
        value it needs is missing)."""
        self.target = target
        try:
            self.met = bool(predicate())
        except (TypeError, KeyError, AttributeError, ZeroDivisionError):
            self.met = None
        return self


@dataclass
class Context:
    """Under what conditions figures were taken (the machine is shared)."""

    loads: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    notes: list[str] = field(default_factory=list)

    def note_load(self, section: str) -> str:
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
        self.loads[section] = load
        return load


def _verdict(row: Row) -> str:
    if not row.target:
        return ""
    return {True: "met", False: "NOT met", None: "n/a"}[row.met]


def table_lines(rows: Sequence[Row], *, markdown: bool) -> list[str]:
    header = ["section", "metric", "unit", PY, C, "floor", "py/C", "target", "verdict"]
    body = [[r.section, r.metric, r.unit, fmt(r.values.get(PY), r.digits),
             fmt(r.values.get(C), r.digits), fmt(r.values.get(FLOOR), r.digits), r.ratio(),
             r.target, _verdict(r)] for r in rows]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |"
                for line in body]
        return out
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
            for line in body]
    return out


def machine() -> str:
    cpus = os.cpu_count() or 0
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"Linux {platform.release()}, {cpus} CPUs ({model}), Python {platform.python_version()}"


def write_markdown(path: str, rows: Sequence[Row], ctx: Context, *, command: str,
                   versions: dict[str, str], elapsed: float) -> None:
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ctx.started))
    lines = [
        "# mptcpd-py vs mptcpd: benchmark results",
        "",
        f"Written by `{command}` on {when}, in {elapsed:.0f} s.",
        "",
        f"- machine: {machine()}",
        "- daemons: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "- load average (1/5/15 min) when each section started: "
        + "; ".join(f"{k} {v}" for k, v in ctx.loads.items()),
        "- values are `median / p95 / max` over the repetitions (n in the notes), or a single "
        "figure; `py/C` compares the medians; the verdict is mptcpd-py against its target.",
        "- wall-clock latencies depend on the machine's load (it is shared with other jobs); "
        "CPU times come from the scheduler (`se.sum_exec_runtime`) and are steadier.",
        "",
    ]
    lines += table_lines(rows, markdown=True)
    notes = [f"- **{r.section} / {r.metric}**: {r.note}" for r in rows if r.note]
    if notes or ctx.notes:
        lines += ["", "## Notes", ""] + notes + [f"- {n}" for n in ctx.notes]
    lines += ["", "How each figure is taken, and how the two daemons are configured: "
              "[bench/README.md](README.md).", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
