"""uvloop (the ``uvloop`` extra): streamq and the raw loops on uvloop vs asyncio's loop.

Consume (no-op handler, concurrency 100) and publish one at a time, each design on
both loops, side by side.

    python benchmarks/bench_uvloop.py [--quick] [--repeat N] [--messages N]
"""

from __future__ import annotations

import argparse
import sys

from _common import Case, Plan, Target, main


def plan(args: argparse.Namespace) -> Plan:
    n = args.messages or (100_000 if args.quick else 200_000)
    one = max(n // 10, 5_000)
    raw_c = "raw inline consume"
    raw_p = "raw XADD one at a time"
    sq_c = "streamq consume"
    sq_p = "streamq publish() one at a time"
    cases = [
        Case(raw_c, "raw_inline", {"messages": n}),
        Case(sq_c, "streamq_consume", {"messages": n}, vs=raw_c),
        Case(raw_c + " ", "raw_inline", {"messages": n}, loop="uvloop"),
        Case(sq_c + " ", "streamq_consume", {"messages": n}, loop="uvloop", vs=sq_c),
        Case(raw_p, "raw_publish", {"mode": "one", "messages": one}),
        Case(sq_p, "streamq_publish", {"mode": "one", "messages": one}, vs=raw_p),
        Case(raw_p + " ", "raw_publish", {"mode": "one", "messages": one}, loop="uvloop"),
        Case(
            sq_p + " ", "streamq_publish", {"mode": "one", "messages": one}, loop="uvloop", vs=sq_p
        ),
    ]
    targets = [
        Target(
            "uvloop: consume >= 0.5x raw inline (both uvloop)",
            cases[3].label,
            cases[2].label,
            "rate",
            ">=",
            0.5,
        ),
        Target(
            "uvloop: consume CPU/msg <= 2.5x raw (both uvloop)",
            cases[3].label,
            cases[2].label,
            "cpu_per_message",
            "<=",
            2.5,
        ),
        Target(
            "uvloop: publish one >= 0.85x raw (both uvloop)",
            cases[7].label,
            cases[6].label,
            "rate",
            ">=",
            0.85,
        ),
    ]
    return cases, targets


if __name__ == "__main__":
    sys.exit(main("uvloop", "uvloop vs asyncio", plan))
