"""Consume throughput: streamq vs the raw redis-py ceiling, raw queue designs, FastStream, taskiq.

A backlog of ~100-byte, 4-field messages, a no-op handler, concurrency 100.

    python benchmarks/bench_consume.py [--quick] [--repeat N] [--messages N]
"""

from __future__ import annotations

import argparse
import sys

from _common import Case, Plan, Target, main


def plan(args: argparse.Namespace) -> Plan:
    n = args.messages or (100_000 if args.quick else 200_000)
    slow = max(n // 20, 5_000)  # FastStream and per-message acks run ~50x slower
    cases = [
        Case("raw inline (XREADGROUP 500, 1 XACK/read)", "raw_inline", {"messages": n}),
        Case(
            "streamq (concurrency 100)",
            "streamq_consume",
            {"messages": n, "concurrency": 100},
            vs="raw inline (XREADGROUP 500, 1 XACK/read)",
        ),
        Case(
            "raw Queue + 100 workers, batched acks",
            "raw_queue",
            {"messages": n},
            vs="raw inline (XREADGROUP 500, 1 XACK/read)",
        ),
        Case(
            "raw Queue + 100 workers, XACK per message",
            "raw_queue",
            {"messages": slow, "per_message_ack": True},
            vs="raw inline (XREADGROUP 500, 1 XACK/read)",
        ),
        Case(
            "FastStream 0.7 StreamSub, group",
            "faststream",
            {"messages": slow},
            vs="raw inline (XREADGROUP 500, 1 XACK/read)",
        ),
        Case(
            "taskiq-redis 1.2 stream broker, 1 worker",
            "taskiq",
            {"messages": slow},
            vs="raw inline (XREADGROUP 500, 1 XACK/read)",
        ),
    ]
    raw = cases[0].label
    sq = cases[1].label
    targets = [
        Target("consume >= 0.5x raw inline ceiling", sq, raw, "rate", ">=", 0.5),
        Target("consume >= 20x FastStream StreamSub", sq, cases[4].label, "rate", ">=", 20.0),
        Target("CPU/msg <= 2.5x raw inline", sq, raw, "cpu_per_message", "<=", 2.5),
    ]
    return cases, targets


if __name__ == "__main__":
    sys.exit(main("consume", "Consume: no-op handler, concurrency 100", plan))
