"""``streamq bench``: publish and consume throughput, and latency, with a progress bar.

The measurements are those of :mod:`streamq._bench` (the streamq halves of the
benchmark suite in ``benchmarks/``, which measures more: baselines, memory, server
round trips), run one after the other, each on a scratch stream of its own. This
module adds the progress bars and the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from .._bench import (
    BenchResult,
    Progress,
    run_consume_benchmark,
    run_latency_benchmark,
    run_publish_benchmark,
)
from ._run import INCOMPLETE

__all__ = ["run_bench"]


def _report(result: BenchResult) -> dict[str, Any]:
    """One run as ``--json`` shows it (times in seconds, latencies in milliseconds)."""
    latency_ms: dict[str, float] = {}
    if result.latency_p50 is not None:
        latency_ms = {
            "p50": result.latency_p50 * 1000,
            "p90": result.extra.get("p90", 0.0) * 1000,
            "p99": (result.latency_p99 or 0.0) * 1000,
            "max": (result.latency_max or 0.0) * 1000,
        }
    return {
        "name": result.name,
        "messages": result.messages,
        "seconds": result.seconds,
        "cpu_seconds": result.cpu_seconds,
        "latency_ms": latency_ms,
        "pending_after": int(result.extra.get("pending_after", 0)),
        "rate": result.rate,
        "cpu_us_per_message": result.cpu_per_message * 1e6,
    }


async def run_bench(args: argparse.Namespace, url: str, server: str, progress_class: Any) -> int:
    """Run the three measurements and print them (a table, or JSON with ``--json``)."""
    results: list[BenchResult] = []

    async def step(label: str, run: Callable[[Progress], Awaitable[BenchResult]]) -> None:
        bar = progress_class(label, mode=args.progress)
        try:
            results.append(await run(lambda done, total: bar.update(done, total)))
        finally:
            bar.close()

    messages = max(args.messages, 1)
    concurrency = args.concurrency
    await step(
        "publish",
        lambda tick: run_publish_benchmark(
            url,
            mode="concurrent",
            messages=messages,
            tasks=100,
            name="publish (100 tasks)",
            progress=tick,
        ),
    )
    await step(
        "consume",
        lambda tick: run_consume_benchmark(
            url,
            messages=messages,
            concurrency=concurrency,
            read_timeout=0.5,
            name=f"consume (concurrency {concurrency})",
            progress=tick,
        ),
    )
    rate, seconds = args.latency_rate, args.latency_seconds
    if seconds > 0 and rate > 0:
        await step(
            "latency",
            lambda tick: run_latency_benchmark(
                url,
                rate=rate,
                seconds=seconds,
                concurrency=concurrency,
                name=f"latency at {rate:,.0f} msg/s",
                progress=tick,
            ),
        )
    runs = [_report(r) for r in results]
    # A run that left entries unacknowledged measured something else than it claims.
    code = INCOMPLETE if any(r["pending_after"] for r in runs) else 0
    if args.json:
        json.dump({"server": server, "runs": runs}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return code
    print(f"server: {server}")
    print()
    print(f"{'run':<26} {'messages':>9} {'seconds':>8} {'msg/s':>9} {'CPU us/msg':>10}")
    for r in runs:
        print(
            f"{r['name']:<26} {r['messages']:>9,} {r['seconds']:>8.2f} {r['rate']:>9,.0f} "
            f"{r['cpu_us_per_message']:>10.1f}"
        )
    for r in runs:
        if r["latency_ms"]:
            lat = r["latency_ms"]
            print()
            print(
                f"latency (publish to handler, {r['name'].removeprefix('latency ')}): "
                f"p50 {lat['p50']:.2f} ms  p90 {lat['p90']:.2f} ms  "
                f"p99 {lat['p99']:.2f} ms  max {lat['max']:.2f} ms"
            )
    for r in runs:
        if r["pending_after"]:
            print(
                f"\n{r['name']}: {r['pending_after']:,} entries left pending: the run is not valid"
            )
    return code
