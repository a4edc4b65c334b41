"""Publish throughput: streamq's publish / publish_many vs raw redis-py XADD.

* ``publish`` awaited one at a time vs one awaited ``XADD`` at a time;
* ``publish_many`` (lists of 1000) vs pipelined ``XADD``, 1000 per round trip;
* ``publish`` from 100 tasks at once (streamq coalesces them into pipelines) vs
  ``XADD`` from 100 tasks on redis-py's connection pool;
* the first two again with ``idempotent=True`` (one more field per entry).

    python benchmarks/bench_publish.py [--quick] [--repeat N] [--messages N]
"""

from __future__ import annotations

import argparse
import sys

from _common import Case, Plan, Target, main


def plan(args: argparse.Namespace) -> Plan:
    one = args.messages or (10_000 if args.quick else 20_000)
    many = one * 10
    raw_one = "raw XADD, awaited one at a time"
    raw_many = "raw XADD, pipelined 1000/round trip"
    raw_conc = "raw XADD from 100 tasks"
    cases = [
        Case(raw_one, "raw_publish", {"mode": "one", "messages": one}),
        Case(
            "streamq publish(), one at a time",
            "streamq_publish",
            {"mode": "one", "messages": one},
            vs=raw_one,
        ),
        Case(raw_many, "raw_publish", {"mode": "many", "messages": many}),
        Case(
            "streamq publish_many(), 1000 per call",
            "streamq_publish",
            {"mode": "many", "messages": many},
            vs=raw_many,
        ),
        Case(raw_conc, "raw_publish", {"mode": "concurrent", "messages": many // 2, "tasks": 100}),
        Case(
            "streamq publish() from 100 tasks",
            "streamq_publish",
            {"mode": "concurrent", "messages": many // 2, "tasks": 100},
            vs=raw_conc,
        ),
        Case(
            "streamq publish(), one at a time, idempotent",
            "streamq_publish",
            {"mode": "one", "messages": one, "idempotent": True},
            vs=raw_one,
        ),
        Case(
            "streamq publish_many(), idempotent",
            "streamq_publish",
            {"mode": "many", "messages": many, "idempotent": True},
            vs=raw_many,
        ),
    ]
    targets = [
        Target(
            "publish one at a time >= 0.85x raw awaited XADD",
            cases[1].label,
            raw_one,
            "rate",
            ">=",
            0.85,
        ),
        Target(
            "publish_many >= 0.9x raw pipelined XADD", cases[3].label, raw_many, "rate", ">=", 0.9
        ),
        Target(
            "concurrent publish >= 1x raw concurrent XADD",
            cases[5].label,
            raw_conc,
            "rate",
            ">=",
            1.0,
        ),
    ]
    return cases, targets


if __name__ == "__main__":
    sys.exit(main("publish", "Publish: ~100-byte messages of 4 fields", plan))
