"""The admin commands of ``streamq``: ``info``, ``pending``, ``dead``, ``replay``, ``trim``,
``prune``.

Each is an async function of the parsed arguments that connects (through
:func:`._run._connect`), calls the matching function of :mod:`streamq._admin`,
and prints the result as text or, with ``--json``, as JSON; it returns the exit
code. Errors are left to :func:`._run._run`, which maps them to exit codes.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from .. import _admin
from .._trim import TrimResult
from ._output import (
    Progress,
    _num,
    _print_json,
    _print_rows,
    _seconds,
    _show,
    _table,
    _when,
)
from ._run import OK, _connect

__all__ = ["_dead", "_info", "_pending", "_prune", "_replay", "_trim"]


async def _info(args: argparse.Namespace) -> int:
    async with _connect(args) as transport:
        info = await _admin.stream_info(transport, args.stream, dead_letter_stream=args.dead)
    if args.json:
        _print_json(asdict(info))
        return OK
    rows = [
        ("stream", info.stream),
        ("server", info.server),
        ("length", _num(info.length)),
        ("first entry", info.first_id or "-"),
        ("last entry", info.last_id or "-"),
        ("dead letters", f"{_num(info.dead_letters)} in {info.dead_letter_stream}"),
        ("groups", _num(len(info.groups))),
    ]
    _print_rows(rows)
    for g in info.groups:
        print()
        oldest = "-"
        if g.oldest_pending_id is not None:
            oldest = (
                f"{g.oldest_pending_id}, idle {_seconds(g.oldest_pending_idle)}, "
                f"{g.oldest_pending_deliveries} deliveries"
            )
        print(f"group {g.name}")
        print(f"  pending         {_num(g.pending)}")
        print(f"  lag             {_num(g.lag) if g.lag is not None else 'unknown'}")
        print(f"  last delivered  {g.last_delivered_id}")
        print(f"  oldest pending  {oldest}")
        if g.consumers:
            print(
                _table(
                    [(c.name, c.pending, _seconds(c.idle)) for c in g.consumers],
                    ["consumer", "pending", "idle"],
                    indent="  ",
                )
            )
        else:
            print("  (no consumers)")
    return OK


async def _pending(args: argparse.Namespace) -> int:
    async with _connect(args) as transport:
        report = await _admin.pending(
            transport,
            args.stream,
            args.group,
            count=args.count,
            consumer=args.consumer,
            min_idle=args.min_idle,
        )
    if args.json:
        _print_json(asdict(report))
        return OK
    if report.total == 0:
        print(f"group {report.group} of {report.stream}: nothing pending")
        return OK
    print(
        f"group {report.group} of {report.stream}: {report.total:,} pending "
        f"({report.lowest_id} .. {report.highest_id})"
    )
    print(_table(sorted(report.per_consumer.items()), ["consumer", "pending"], indent="  "))
    if report.entries:
        print()
        print(
            _table(
                [(e.id, e.consumer, _seconds(e.idle), e.deliveries) for e in report.entries],
                ["id", "consumer", "idle", "deliveries"],
            )
        )
        shown = len(report.entries)
        if shown < report.total and not args.consumer and not args.min_idle:
            print(f"({shown} of {report.total:,} shown; --count N for more)")
    return OK


async def _dead(args: argparse.Namespace) -> int:
    async with _connect(args) as transport:
        dead, length, letters = await _admin.dead_letters(
            transport, args.stream, dead_letter_stream=args.dead, count=args.count
        )
    if args.json:
        _print_json(
            {
                "dead_letter_stream": dead,
                "length": length,
                "entries": [
                    {
                        **asdict(d),
                        "fields": {
                            k.decode("utf-8", "backslashreplace"): v.decode(
                                "utf-8", "backslashreplace"
                            )
                            for k, v in d.fields.items()
                        },
                    }
                    for d in letters
                ],
            }
        )
        return OK
    if not letters:
        print(f"no dead letters in {dead}")
        return OK
    print(f"{length:,} dead letter(s) in {dead}")
    for d in letters:
        print()
        print(f"{d.id}  (was {d.original_id or '?'} in {d.original_stream or '?'})")
        print(
            f"  group {d.group or '?'}, consumer {d.consumer or '?'}, "
            f"{d.deliveries if d.deliveries is not None else '?'} deliveries, "
            f"dead since {_when(d.dead_at)}"
        )
        print(f"  error: {d.error or '(none recorded)'}")
        for k, v in d.fields.items():
            print(f"  {_show(k, 30)} = {_show(v)}")
    if len(letters) < length:
        print(f"\n({len(letters)} of {length:,} shown; --count N for more)")
    return OK


async def _replay(args: argparse.Namespace) -> int:
    bar = Progress("replay", mode=args.progress)
    async with _connect(args) as transport:
        try:
            result = await _admin.replay(
                transport,
                args.stream,
                dead_letter_stream=args.dead,
                count=args.count,
                ids=args.ids or None,
                dry_run=args.dry_run,
                progress=lambda done, total: bar.update(done, total),
            )
        finally:
            bar.close()
    if args.json:
        _print_json(asdict(result))
        return OK
    verb = "would replay" if result.dry_run else "replayed"
    line = (
        f"{verb} {result.replayed:,} dead letter(s) "
        f"from {result.dead_letter_stream} to {result.stream}"
    )
    if result.skipped:
        line += f" ({result.skipped:,} of other streams left alone)"
    print(line)
    return OK


async def _trim(args: argparse.Namespace) -> int:
    async with _connect(args) as transport:
        result = await _admin.trim(
            transport,
            args.stream,
            args.maxlen,
            approximate=args.approximate,
            dry_run=args.dry_run,
        )
    if args.json:
        _print_json({"dry_run": args.dry_run, **asdict(result)})
        return OK
    if isinstance(result, TrimResult):
        print(
            f"trimmed {result.deleted:,} of {result.length_before:,} entries from {result.stream}"
        )
    else:
        print(
            f"would trim {result.would_delete:,} of {result.length:,} entries from {result.stream}"
        )
    if result.limited_by_groups:
        print(
            f"kept everything from {result.keep_from} on: a consumer group has not "
            "read or acknowledged it yet"
        )
    return OK


async def _prune(args: argparse.Namespace) -> int:
    async with _connect(args) as transport:
        result = await _admin.prune(
            transport, args.stream, args.group, args.idle, dry_run=args.dry_run
        )
    if args.json:
        _print_json(asdict(result))
        return OK
    verb = "would delete" if result.dry_run else "deleted"
    names = ", ".join(result.deleted) if result.deleted else "none"
    print(
        f"{verb} {len(result.deleted):,} consumer(s) of group {result.group} idle "
        f"{_seconds(result.idle)} or more: {names}"
    )
    if result.held:
        print(
            f"kept {len(result.held):,} idle consumer(s) that still hold pending entries "
            "(a running consumer claims them after pending_timeout):"
        )
        print(
            _table(
                [(c.name, c.pending, _seconds(c.idle)) for c in result.held],
                ["consumer", "pending", "idle"],
                indent="  ",
            )
        )
    return OK
