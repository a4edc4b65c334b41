"""Failing handlers: 10% of first deliveries fail and are retried, vs all succeeding.

Retries go through the consumer's retrier, which re-claims due messages in batched
``XCLAIM`` calls; each run records the server's per-command call counts
(``extra.commands`` in the JSON), and the table's targets check how many retries
share one ``XCLAIM``.

A message waiting for its retry keeps only its ID and does not count against the
buffer (``buffer_size + concurrency``), so failing messages do not throttle
reading: the rows with a 100 ms backoff run near 0.6x the all-success rate
with or without a larger buffer (the last retries' 100 ms wait is part of the
measured interval). When waiting retries counted against the buffer,
throughput was capped near ``capacity / (f * b)`` with ``f`` failing and
backoff ``b``: about 11,000 msg/s with the defaults.

    python benchmarks/bench_retry.py [--quick] [--repeat N] [--messages N]
"""

from __future__ import annotations

import argparse
import sys

from _common import Case, Plan, Target, main


def plan(args: argparse.Namespace) -> Plan:
    n = args.messages or (100_000 if args.quick else 200_000)
    slow = max(n // 4, 10_000)
    ok = "streamq, all succeed"
    fast = "streamq, 10% fail once, retry after 1 ms"
    cases = [
        Case(ok, "streamq_consume", {"messages": n}),
        Case(
            fast,
            "streamq_consume",
            {"messages": n, "fail_every": 10, "retry_backoff": 0.001},
            vs=ok,
        ),
        Case(
            "streamq, 10% fail once, retry after 100 ms",
            "streamq_consume",
            {"messages": slow, "fail_every": 10, "retry_backoff": 0.1},
            vs=ok,
        ),
        Case(
            "  same, buffer_size=3000",
            "streamq_consume",
            {"messages": slow, "fail_every": 10, "retry_backoff": 0.1, "buffer_size": 3000},
            vs=ok,
        ),
    ]
    targets = [
        Target("10% failing (1 ms backoff) >= 0.8x all-success", fast, ok, "rate", ">=", 0.8),
        Target(
            "XCLAIM calls per retried message <= 0.2", fast, None, "xclaim_per_retry", "<=", 0.2
        ),
    ]
    return cases, targets


if __name__ == "__main__":
    sys.exit(main("retry", "Retries: 10% failing handlers", plan))
