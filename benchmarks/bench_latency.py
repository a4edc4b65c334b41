"""Latency from publish to handler start at a steady rate (default 5,000 msg/s).

A separate process publishes one ``XADD`` at a time at an even pace, each entry
stamped with ``time.monotonic_ns()``; the consumer records when its handler starts.
streamq (concurrency 100, default buffer and read_timeout) vs the raw inline loop
(``XREADGROUP BLOCK``, handler inline, one ``XACK`` per read).

    python benchmarks/bench_latency.py [--quick] [--repeat N]   # default 5 rounds
"""

from __future__ import annotations

import argparse
import sys

from _common import Case, Plan, Target, main


def plan(args: argparse.Namespace) -> Plan:
    seconds = 2.0 if args.quick else 4.0
    rate = 5000.0
    raw = "raw inline loop"
    cases = [
        Case(raw, "raw_latency", {"rate": rate, "seconds": seconds}),
        Case(
            "streamq (concurrency 100)",
            "streamq_latency",
            {"rate": rate, "seconds": seconds, "concurrency": 100},
            vs=raw,
        ),
    ]
    targets = [
        Target(
            "p99 publish->handler <= 2x raw loop's p99",
            cases[1].label,
            raw,
            "latency_p99",
            "<=",
            2.0,
            aggregate="medians",
        ),
    ]
    return cases, targets


if __name__ == "__main__":
    sys.exit(main("latency", "Latency: publish -> handler start at 5,000 msg/s", plan, 5))
