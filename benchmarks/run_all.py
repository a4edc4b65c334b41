"""Run every benchmark against one throwaway server and print a summary of the targets.

    python benchmarks/run_all.py [--quick] [--repeat N]

``nox -s bench`` runs this. Results go to ``benchmarks/results/*.json`` (git-ignored),
one file per benchmark plus ``all-<time>.json``; the exit status is 1 if a target
was missed.
"""

from __future__ import annotations

import sys
import time

import bench_consume
import bench_latency
import bench_memory
import bench_publish
import bench_retry
import bench_uvloop
from _common import machine, parse_args, run_and_print, server, write_json

SUITE = [
    ("consume", "Consume: no-op handler, concurrency 100", bench_consume.plan, None),
    ("publish", "Publish: ~100-byte messages of 4 fields", bench_publish.plan, None),
    # Five rounds: a p99 on a shared machine swings with every scheduling hiccup.
    ("latency", "Latency: publish -> handler start at 5,000 msg/s", bench_latency.plan, 5),
    ("retry", "Retries: 10% failing handlers", bench_retry.plan, None),
    ("uvloop", "uvloop vs asyncio", bench_uvloop.plan, None),
    # One round: draining a million entries twice is the longest run of the suite.
    ("memory", "Memory: draining a backlog", bench_memory.plan, 1),
]


def main() -> int:
    args = parse_args(__doc__ or "")
    started = time.monotonic()
    reports = {}
    with server(args.engine) as (url, server_desc):
        for name, title, plan_fn, repeat in SUITE:
            run_args = args
            if repeat is not None and not args.quick and not args.repeat_given:
                run_args = type(args)(**{**vars(args), "repeat": repeat})
            reports[name] = run_and_print(
                name, title, plan_fn(run_args), url, server_desc, run_args
            )
    print("# Targets")
    ok = True
    for name, report in reports.items():
        for t in report["targets"]:
            ok = ok and t["ok"]
            print(
                f"{'ok ' if t['ok'] else 'NO '} {name:8} {t['target']:<58} "
                f"{t['measured']:8.2f} ({t['min']:.2f}..{t['max']:.2f})"
            )
    print(f"\n{time.monotonic() - started:.0f} s; {machine()['cpu']}, {machine()['cpus']} CPUs")
    if not args.no_json:
        path = write_json("all", {"machine": machine(), "server": server_desc, "reports": reports})
        print(f"(wrote {path})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
