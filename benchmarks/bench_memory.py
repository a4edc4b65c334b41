"""Memory: draining a 1,000,000-message backlog must keep the consumer's RSS flat.

streamq (concurrency 100, default buffer) and the raw inline loop each drain their
own backlog in a fresh process; the table's dRSS is the peak resident memory above
the process' RSS when draining started (sampled every 50 ms).

    python benchmarks/bench_memory.py [--messages N] [--quick]   # quick: 200,000
"""

from __future__ import annotations

import argparse
import sys

from _common import Case, Plan, Target, main


def plan(args: argparse.Namespace) -> Plan:
    n = args.messages or (200_000 if args.quick else 1_000_000)
    raw = "raw inline (XREADGROUP 500, 1 XACK/read)"
    cases = [
        Case(raw, "raw_inline", {"messages": n}),
        Case("streamq (concurrency 100)", "streamq_consume", {"messages": n}, vs=raw),
    ]
    targets = [
        Target(
            f"RSS growth draining {n:,} <= 5 MiB", cases[1].label, None, "rss_growth_mib", "<=", 5.0
        ),
    ]
    return cases, targets


if __name__ == "__main__":
    sys.exit(main("memory", "Memory: draining a backlog", plan, default_repeat=1))
