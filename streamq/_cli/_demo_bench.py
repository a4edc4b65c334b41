"""The ``streamq demo`` and ``streamq bench`` commands, and the server they run on.

Both run on the server of ``--url`` (or ``$REDIS_URL``) when one is given, else
on a throwaway server started for the run and stopped at the end (see
:func:`streamq._demo.demo_server`). The demo itself is :mod:`streamq._demo`; the
benchmark's runs and report are :mod:`._bench_report`. Both are imported only
when their command runs, so the other commands start without them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from ._output import Progress, _num, _print_json, _print_rows, _redact
from ._run import INCOMPLETE, OK, _connect, _url

__all__ = ["_bench", "_demo"]


def _given_url(args: argparse.Namespace) -> str | None:
    """``--url`` or ``$REDIS_URL``, checked; None: demo and bench start their own server."""
    return _url(args) if args.url or os.environ.get("REDIS_URL") else None


@contextlib.asynccontextmanager
async def _own_or_given_server(
    args: argparse.Namespace, url: str | None, purpose: str
) -> AsyncIterator[tuple[str, str]]:
    """Yield ``(url, description)`` of ``url``'s server, or of a throwaway one started here."""
    from .._demo import demo_server

    async with demo_server(url, purpose) as (server_url, description):
        if url is not None:
            # Fail fast with a clear message instead of retrying an unreachable server.
            async with _connect(args):
                pass
        yield server_url, _redact(description)


async def _demo(args: argparse.Namespace) -> int:
    from .._demo import run_demo

    url = _given_url(args)
    bar = Progress("demo", mode=args.progress)

    def progress(done: int, total: int, stats: Any) -> None:
        bar.update(
            done,
            total,
            f"retried {stats.retried:,}  dead-lettered {stats.dead_lettered:,}",
        )

    started = "starting a throwaway Redis server ..." if url is None else f"using {_redact(url)}"
    print(f"streamq demo: {started}", file=sys.stderr)
    async with _own_or_given_server(args, url, "demo") as (server_url, description):
        try:
            summary = await run_demo(
                server_url,
                server=description,
                messages=args.messages,
                rate=args.rate,
                concurrency=args.concurrency,
                work=args.work_ms / 1000,
                give_up_after=args.give_up_after,
                keep=args.keep and url is not None,
                progress=progress,
            )
        finally:
            bar.close()
    if args.json:
        _print_json(summary.as_dict())
        return OK if summary.complete else INCOMPLETE
    lat = summary.latency_ms
    rows = [
        ("server", summary.server),
        ("published", _num(summary.published)),
        ("handled", f"{_num(summary.succeeded)}  ({_num(summary.handler_calls)} handler calls)"),
        ("retried", _num(summary.retried)),
        (
            "dead-lettered",
            f"{_num(summary.dead_lettered)}  "
            + (f"(kept in {summary.stream}:dead)" if summary.kept else "(then deleted)"),
        ),
        ("left pending", _num(summary.pending_after)),
        ("time", f"{summary.seconds:.2f} s"),
        ("throughput", f"{summary.throughput:,.0f} msg/s"),
        (
            "latency",
            f"p50 {lat['p50']:.1f} ms  p90 {lat['p90']:.1f} ms  "
            f"p99 {lat['p99']:.1f} ms  max {lat['max']:.1f} ms",
        ),
    ]
    print()
    _print_rows(rows, indent="  ")
    print()
    if summary.complete:
        print("  every message was handled or dead-lettered; nothing is left pending")
        print("  (latency: from publish to handled; retried messages include their backoff)")
        if summary.kept:
            print(f"\n  next: streamq dead {summary.stream}   streamq replay {summary.stream}")
        return OK
    print("  the demo did not finish: see the counts above")
    return INCOMPLETE


async def _bench(args: argparse.Namespace) -> int:
    from ._bench_report import run_bench

    url = _given_url(args)
    async with _own_or_given_server(args, url, "benchmark") as (server_url, description):
        return await run_bench(args, server_url, description, Progress)
