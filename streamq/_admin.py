"""Inspection and repair of streams and groups: what ``streamq info/pending/dead/replay/trim`` do.

Every function takes a :class:`~streamq._transport.Transport` (raw RESP2 replies)
and returns plain dataclasses, so the command line only formats them. Errors
from redis-py are converted with :func:`~streamq._errors.convert`; a missing
stream or group becomes :class:`NotFoundError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._dead_letter import DEAD_FIELDS
from ._errors import StreamqError, convert, is_nogroup
from ._pruner import delete_idle_consumers
from ._transport import Transport
from ._trim import TrimResult, safe_trim, safe_trim_point

__all__ = [
    "ConsumerInfo",
    "DeadLetter",
    "GroupInfo",
    "NotFoundError",
    "PendingEntry",
    "PendingReport",
    "PruneResult",
    "ReplayResult",
    "StreamInfo",
    "TrimPlan",
    "count_after",
    "dead_letters",
    "pending",
    "prune",
    "replay",
    "stream_info",
    "trim",
]

# Counting a lag by hand (servers without XINFO's lag) stops here.
_LAG_COUNT_LIMIT = 100_000
_REPLAY_BATCH = 200
_META = frozenset(DEAD_FIELDS)


class NotFoundError(StreamqError):
    """The stream, consumer group or dead-letter stream does not exist."""


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _pairs(raw: Any) -> dict[str, Any]:
    items = list(raw or ())
    return {_text(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _int(value: Any, default: int | None = None) -> int | None:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _successor(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


async def _run(transport: Transport, what: str, *args: Any) -> Any:
    try:
        return await transport.execute(*args)
    except Exception as exc:
        raise convert(exc, what) from None


async def _require_stream(transport: Transport, stream: str) -> None:
    kind = _text(await _run(transport, f"TYPE {stream}", "TYPE", stream))
    if kind == "none":
        raise NotFoundError(f"stream {stream!r} does not exist")
    if kind != "stream":
        raise NotFoundError(f"{stream!r} is a {kind}, not a stream")


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    """One consumer of a group.

    Attributes:
        name: The consumer's name.
        pending: Entries delivered to it and not acknowledged.
        idle: Seconds since it last interacted with the group.
    """

    name: str
    pending: int
    idle: float


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One consumer group of a stream.

    Attributes:
        name: The group's name.
        pending: Entries delivered and not acknowledged.
        last_delivered_id: The last entry delivered to a consumer of the group.
        lag: Entries not delivered to the group yet (``None`` if unknown).
        oldest_pending_id: The pending entry with the lowest ID, if any.
        oldest_pending_idle: Seconds since that entry was last delivered.
        oldest_pending_deliveries: How many times it was delivered.
        consumers: The group's consumers.
    """

    name: str
    pending: int
    last_delivered_id: str
    lag: int | None
    oldest_pending_id: str | None
    oldest_pending_idle: float | None
    oldest_pending_deliveries: int | None
    consumers: list[ConsumerInfo]


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream, its groups, and its dead-letter stream.

    Attributes:
        stream: The stream's key.
        length: Entries in the stream.
        first_id: ID of the oldest entry (``None`` when empty).
        last_id: ID of the newest entry (``None`` when empty).
        last_generated_id: The last ID Redis generated (survives deletions).
        groups: The consumer groups.
        dead_letter_stream: The dead-letter stream's key.
        dead_letters: Entries in the dead-letter stream (0 when it does not exist).
        server: The server's :attr:`~streamq._capabilities.ServerInfo.description`, e.g.
            ``"Redis 7.0.15"`` or ``"Valkey 8.1.8 (Redis 7.2.4 compatible)"``.
    """

    stream: str
    length: int
    first_id: str | None
    last_id: str | None
    last_generated_id: str
    groups: list[GroupInfo]
    dead_letter_stream: str
    dead_letters: int
    server: str


async def count_after(
    transport: Transport, stream: str, after: str, *, limit: int = _LAG_COUNT_LIMIT
) -> int | None:
    """Entries with an ID above ``after``, counted in pages (``None`` past ``limit``).

    The lag of a group on servers whose ``XINFO GROUPS`` has none (Redis < 7.0).
    """
    count = 0
    start = "(" + after if after != "0-0" else "-"
    while True:
        page = await _run(
            transport, f"XRANGE {stream}", "XRANGE", stream, start, "+", "COUNT", 1000
        )
        if not page:
            return count
        count += len(page)
        if count > limit:
            return None
        start = "(" + _text(page[-1][0])


async def stream_info(
    transport: Transport, stream: str, *, dead_letter_stream: str = "{stream}:dead"
) -> StreamInfo:
    """Describe ``stream``: length, first/last IDs, groups with consumers, dead letters.

    Raises:
        NotFoundError: The stream does not exist.
        NetworkError, RedisError: Redis could not be reached or refused a command.
    """
    server = await _server(transport)
    await _require_stream(transport, stream)
    info = _pairs(await _run(transport, f"XINFO STREAM {stream}", "XINFO", "STREAM", stream))
    first = info.get("first-entry")
    last = info.get("last-entry")
    groups: list[GroupInfo] = []
    raw_groups = await _run(transport, f"XINFO GROUPS {stream}", "XINFO", "GROUPS", stream)
    for raw in raw_groups or ():
        g = _pairs(raw)
        name = _text(g["name"])
        last_delivered = _text(g.get("last-delivered-id", b"0-0"))
        lag = _int(g.get("lag"))
        if lag is None:
            # Redis < 7.0 has no lag field; 7.x leaves it empty after deletions.
            lag = await count_after(transport, stream, last_delivered)
        oldest_id = oldest_idle = oldest_deliveries = None
        if _int(g.get("pending"), 0):
            rows = await _run(
                transport, f"XPENDING {stream}", "XPENDING", stream, name, "-", "+", 1
            )
            if rows:
                oldest_id = _text(rows[0][0])
                oldest_idle = int(rows[0][2]) / 1000
                oldest_deliveries = int(rows[0][3])
        consumers = await _consumers(transport, stream, name)
        groups.append(
            GroupInfo(
                name=name,
                pending=_int(g.get("pending"), 0) or 0,
                last_delivered_id=last_delivered,
                lag=lag,
                oldest_pending_id=oldest_id,
                oldest_pending_idle=oldest_idle,
                oldest_pending_deliveries=oldest_deliveries,
                consumers=consumers,
            )
        )
    dead = dead_letter_stream.format(stream=stream)
    dead_count = _int(await _run(transport, f"XLEN {dead}", "XLEN", dead), 0) or 0
    return StreamInfo(
        stream=stream,
        length=_int(info.get("length"), 0) or 0,
        first_id=_text(first[0]) if first else None,
        last_id=_text(last[0]) if last else None,
        last_generated_id=_text(info.get("last-generated-id", b"0-0")),
        groups=groups,
        dead_letter_stream=dead,
        dead_letters=dead_count,
        server=server,
    )


async def _server(transport: Transport) -> str:
    try:
        info = await transport.server_info()
    except StreamqError:
        raise
    except Exception as exc:
        raise convert(exc, "INFO server") from None
    return info.description


@dataclass(frozen=True, slots=True)
class PendingEntry:
    """One entry in a group's pending list.

    Attributes:
        id: The entry's ID.
        consumer: The consumer holding it.
        idle: Seconds since it was last delivered.
        deliveries: How many times it was delivered.
    """

    id: str
    consumer: str
    idle: float
    deliveries: int


@dataclass(frozen=True, slots=True)
class PendingReport:
    """A group's pending list.

    Attributes:
        stream: The stream.
        group: The group.
        total: Pending entries in the group (all consumers).
        lowest_id: The lowest pending ID, if any.
        highest_id: The highest pending ID, if any.
        per_consumer: Pending entries by consumer.
        entries: The first entries (up to the requested count, after filters).
    """

    stream: str
    group: str
    total: int
    lowest_id: str | None
    highest_id: str | None
    per_consumer: dict[str, int]
    entries: list[PendingEntry]


async def pending(
    transport: Transport,
    stream: str,
    group: str,
    *,
    count: int = 50,
    consumer: str | None = None,
    min_idle: float = 0.0,
) -> PendingReport:
    """List a group's pending entries (oldest first).

    Args:
        transport: Where to run the commands.
        stream: The stream.
        group: The consumer group.
        count: At most this many entries in ``entries``.
        consumer: Only entries held by this consumer.
        min_idle: Only entries idle at least this many seconds.

    Raises:
        NotFoundError: The stream or the group does not exist.
    """
    await _require_stream(transport, stream)
    try:
        summary = await transport.execute("XPENDING", stream, group)
    except Exception as exc:
        if is_nogroup(exc):
            raise NotFoundError(
                f"consumer group {group!r} of stream {stream!r} does not exist"
            ) from None
        raise convert(exc, f"XPENDING {stream}") from None
    total = int(summary[0]) if summary else 0
    per_consumer = {_text(name): int(n) for name, n in (summary[3] or ())} if total else {}
    args: list[Any] = ["XPENDING", stream, group]
    if min_idle > 0:
        args += ["IDLE", round(min_idle * 1000)]
    args += ["-", "+", count]
    if consumer is not None:
        args.append(consumer)
    rows = await _run(transport, f"XPENDING {stream}", *args) if total and count > 0 else []
    entries = [
        PendingEntry(
            id=_text(r[0]), consumer=_text(r[1]), idle=int(r[2]) / 1000, deliveries=int(r[3])
        )
        for r in rows or ()
    ]
    return PendingReport(
        stream=stream,
        group=group,
        total=total,
        lowest_id=_text(summary[1]) if total else None,
        highest_id=_text(summary[2]) if total else None,
        per_consumer=per_consumer,
        entries=entries,
    )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry of a dead-letter stream.

    Attributes:
        id: Its ID in the dead-letter stream.
        fields: The message's own fields (metadata removed), undecoded.
        original_id: Its ID in the original stream.
        original_stream: The stream it came from.
        group: The group that gave up on it.
        consumer: The consumer that dead-lettered it.
        deliveries: How many times it was delivered.
        error: The last error (``"Type: text"``), possibly empty.
        dead_at: When it was dead-lettered (Unix time), if recorded.
    """

    id: str
    fields: dict[bytes, bytes]
    original_id: str | None
    original_stream: str | None
    group: str | None
    consumer: str | None
    deliveries: int | None
    error: str | None
    dead_at: float | None


def _dead_letter(raw_id: Any, raw_fields: Any) -> DeadLetter:
    fields: dict[bytes, bytes] = {}
    meta: dict[str, str] = {}
    items = list(raw_fields or ())
    for i in range(0, len(items) - 1, 2):
        name, value = items[i], items[i + 1]
        key = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        if key in _META:
            meta[key] = _text(value)
        else:
            fields[name if isinstance(name, bytes) else str(name).encode()] = (
                value if isinstance(value, bytes) else str(value).encode()
            )
    dead_at = meta.get("streamq-dead-at")
    try:
        dead_time = float(dead_at) if dead_at else None
    except ValueError:
        dead_time = None
    return DeadLetter(
        id=_text(raw_id),
        fields=fields,
        original_id=meta.get("streamq-original-id"),
        original_stream=meta.get("streamq-original-stream"),
        group=meta.get("streamq-group"),
        consumer=meta.get("streamq-consumer"),
        deliveries=_int(meta.get("streamq-deliveries")),
        error=meta.get("streamq-error"),
        dead_at=dead_time,
    )


async def _dead_stream(transport: Transport, stream: str, template: str) -> tuple[str, bool]:
    """The dead-letter stream's key and whether it exists (NotFound if neither does)."""
    dead = template.format(stream=stream)
    kind = _text(await _run(transport, f"TYPE {dead}", "TYPE", dead))
    if kind == "stream":
        return dead, True
    if kind != "none":
        raise NotFoundError(f"dead-letter key {dead!r} is a {kind}, not a stream")
    await _require_stream(transport, stream)
    return dead, False


async def dead_letters(
    transport: Transport,
    stream: str,
    *,
    dead_letter_stream: str = "{stream}:dead",
    count: int = 50,
) -> tuple[str, int, list[DeadLetter]]:
    """The oldest ``count`` dead letters of ``stream``.

    Returns:
        The dead-letter stream's key, its length, and the entries.

    Raises:
        NotFoundError: Neither the stream nor its dead-letter stream exists.
    """
    dead, exists = await _dead_stream(transport, stream, dead_letter_stream)
    if not exists:
        return dead, 0, []
    length = int(await _run(transport, f"XLEN {dead}", "XLEN", dead))
    rows = await _run(transport, f"XRANGE {dead}", "XRANGE", dead, "-", "+", "COUNT", count)
    return dead, length, [_dead_letter(r[0], r[1]) for r in rows or ()]


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a replay did (or, with ``dry_run``, would do).

    Attributes:
        stream: The stream the dead letters went back to.
        dead_letter_stream: Where they came from.
        replayed: Dead letters appended to the stream and deleted from the dead stream.
        skipped: Dead letters of other streams (a shared dead-letter stream), left alone.
        new_ids: The IDs the replayed messages got in ``stream`` (empty on a dry run).
        dry_run: Whether nothing was changed.
    """

    stream: str
    dead_letter_stream: str
    replayed: int
    skipped: int
    new_ids: list[str] = field(default_factory=list)
    dry_run: bool = False


async def replay(
    transport: Transport,
    stream: str,
    *,
    dead_letter_stream: str = "{stream}:dead",
    count: int | None = None,
    ids: list[str] | None = None,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Move dead letters back to ``stream``, without streamq's metadata fields.

    Each batch is first appended to ``stream`` (``XADD``) and only then deleted from
    the dead-letter stream (``XDEL``), so a crash or a lost connection in between
    leaves a message in both places (replayed twice at worst), never in neither.
    Replayed messages are new entries: groups see them as new, with a fresh
    delivery count.

    Args:
        transport: Where to run the commands.
        stream: The original stream.
        dead_letter_stream: The dead-letter stream's template.
        count: Replay at most this many (oldest first); ``None``: all.
        ids: Replay only these dead-letter entry IDs.
        dry_run: Count what would be replayed; change nothing.
        progress: Called with ``(done, total)`` after each batch.

    Raises:
        NotFoundError: Neither the stream nor its dead-letter stream exists, or an
            ID in ``ids`` is not in the dead-letter stream.
    """
    dead, exists = await _dead_stream(transport, stream, dead_letter_stream)
    result = ReplayResult(stream, dead, 0, 0, [], dry_run)
    if not exists:
        return result
    total = int(await _run(transport, f"XLEN {dead}", "XLEN", dead))
    if count is not None:
        total = min(total, count)
    if ids is not None:
        total = len(ids)
    replayed = skipped = 0
    new_ids: list[str] = []
    start = "-"
    remaining_ids = list(ids) if ids is not None else None
    while replayed + skipped < total:
        if remaining_ids is not None:
            batch_ids = remaining_ids[:_REPLAY_BATCH]
            del remaining_ids[:_REPLAY_BATCH]
            rows = []
            for entry_id in batch_ids:
                found = await _run(transport, f"XRANGE {dead}", "XRANGE", dead, entry_id, entry_id)
                if not found:
                    raise NotFoundError(f"no entry {entry_id} in dead-letter stream {dead!r}")
                rows.append(found[0])
        else:
            want = min(_REPLAY_BATCH, total - replayed - skipped)
            rows = await _run(
                transport, f"XRANGE {dead}", "XRANGE", dead, start, "+", "COUNT", want
            )
            if not rows:
                break
            start = "(" + _text(rows[-1][0])
        letters = [_dead_letter(r[0], r[1]) for r in rows]
        mine = [d for d in letters if d.original_stream in (None, stream)]
        skipped += len(letters) - len(mine)
        if dry_run or not mine:
            replayed += len(mine)
        else:
            adds = [["XADD", stream, "*", *_flatten(d.fields)] for d in mine]
            replies = await _pipeline(transport, f"XADD {stream}", adds)
            stored: list[str] = []
            for d, reply in zip(mine, replies, strict=True):
                if isinstance(reply, BaseException):
                    # Delete what was stored before the refusal, keep the rest
                    # (entries after it may be stored too: duplicates at worst).
                    if stored:
                        await _run(transport, f"XDEL {dead}", "XDEL", dead, *stored)
                    raise convert(reply, f"XADD {stream}") from None
                new_ids.append(_text(reply))
                stored.append(d.id)
            # Deleted only once the copies are stored: a crash before this line
            # leaves duplicates, never a gap.
            await _run(transport, f"XDEL {dead}", "XDEL", dead, *stored)
            replayed += len(stored)
        if progress is not None:
            progress(replayed + skipped, total)
    return ReplayResult(stream, dead, replayed, skipped, new_ids, dry_run)


def _flatten(fields: dict[bytes, bytes]) -> list[bytes]:
    out: list[bytes] = []
    for k, v in fields.items():
        out += (k, v)
    return out


async def _pipeline(transport: Transport, what: str, commands: list[list[Any]]) -> list[Any]:
    try:
        return await transport.pipeline(commands)
    except Exception as exc:
        raise convert(exc, what) from None


@dataclass(frozen=True, slots=True)
class TrimPlan:
    """What a safe trim would delete (``streamq trim --dry-run``).

    Attributes:
        stream: The stream.
        length: ``XLEN`` now.
        would_delete: Entries a trim to ``max_length`` would delete.
        keep_from: The oldest entry some group still needs, if any.
        limited_by_groups: Whether a group stops the trim short of ``max_length``.
    """

    stream: str
    length: int
    would_delete: int
    keep_from: str | None
    limited_by_groups: bool


async def trim(
    transport: Transport,
    stream: str,
    max_length: int,
    *,
    approximate: bool = False,
    dry_run: bool = False,
) -> TrimResult | TrimPlan:
    """Safely trim ``stream`` towards ``max_length`` (see :func:`streamq._trim.safe_trim`).

    Raises:
        NotFoundError: The stream does not exist.
    """
    await _require_stream(transport, stream)
    try:
        if not dry_run:
            return await safe_trim(transport, stream, max_length, approximate=approximate)
        length = int(await transport.execute("XLEN", stream))
        excess = length - max_length
        if excess <= 0:
            return TrimPlan(stream, length, 0, None, False)
        keep_from = await safe_trim_point(transport, stream)
        boundary = await transport.execute("XRANGE", stream, "-", "+", "COUNT", excess)
        if not boundary:
            return TrimPlan(stream, length, 0, keep_from, False)
        cut = _successor(_text(boundary[-1][0]))
        limited = False
        if keep_from is not None and _key(keep_from) < _key(cut):
            cut, limited = keep_from, True
        doomed = await transport.execute("XRANGE", stream, "-", "(" + cut, "COUNT", excess)
        return TrimPlan(stream, length, len(doomed or ()), keep_from, limited)
    except StreamqError:
        raise
    except Exception as exc:
        raise convert(exc, f"trim {stream}") from None


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What :func:`prune` deleted (or would delete) from a consumer group.

    Attributes:
        stream: The stream.
        group: The consumer group.
        idle: The idle limit in seconds.
        deleted: Consumers deleted (with ``dry_run``: that would be deleted).
        held: Consumers idle that long but still holding pending entries: left
            alone (claim their entries first, e.g. with a running consumer).
        dry_run: Whether nothing was changed.
    """

    stream: str
    group: str
    idle: float
    deleted: list[str]
    held: list[ConsumerInfo]
    dry_run: bool


async def _consumers(transport: Transport, stream: str, group: str) -> list[ConsumerInfo]:
    try:
        raw = await transport.execute("XINFO", "CONSUMERS", stream, group)
    except Exception as exc:
        if is_nogroup(exc):
            raise NotFoundError(
                f"consumer group {group!r} of stream {stream!r} does not exist"
            ) from None
        raise convert(exc, f"XINFO CONSUMERS {stream}") from None
    out = []
    for row in raw or ():
        c = _pairs(row)
        out.append(
            ConsumerInfo(
                name=_text(c["name"]),
                pending=_int(c.get("pending"), 0) or 0,
                idle=(_int(c.get("idle"), 0) or 0) / 1000,
            )
        )
    return out


async def prune(
    transport: Transport, stream: str, group: str, idle: float, *, dry_run: bool = False
) -> PruneResult:
    """Delete the consumers of ``group`` idle ``idle`` seconds or more that hold nothing.

    The check and the delete are one atomic script (see :mod:`streamq._pruner`), so
    a consumer handed entries meanwhile is kept and no pending entry is dropped.

    Raises:
        NotFoundError: The stream or the group does not exist.
    """
    await _require_stream(transport, stream)
    before = await _consumers(transport, stream, group)
    if dry_run:
        deleted = [c.name for c in before if c.pending == 0 and c.idle >= idle]
    else:
        try:
            deleted = await delete_idle_consumers(transport, stream, group, idle)
        except Exception as exc:
            raise convert(exc, f"prune consumers of {stream}") from None
    after = before if dry_run else await _consumers(transport, stream, group)
    held = [c for c in after if c.pending > 0 and c.idle >= idle]
    return PruneResult(stream, group, idle, deleted, held, dry_run)
