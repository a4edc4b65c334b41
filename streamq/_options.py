"""Options of the consumer and the publisher: frozen, keyword-only, validated."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from ._backoff import Backoff

if TYPE_CHECKING:
    from ._middleware import HandlerMiddleware, PublishMiddleware

__all__ = ["ConsumerOptions", "PublisherOptions", "RedisLike"]

RedisLike: TypeAlias = "aioredis.Redis | RedisCluster | str"
"""A ``redis.asyncio.Redis``, a ``redis.asyncio.cluster.RedisCluster``, or a URL.

A ``redis+cluster://host:port`` (or ``rediss+cluster://``) URL names a Redis
Cluster through one of its nodes.

A client passed in is borrowed and never closed by streamq; a URL makes streamq
build (and close) its own client.
"""

_START_RE = re.compile(r"^(\$|0|\d+(-\d+)?)$")


def _seconds(name: str, value: object, *, allow_zero: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}: expected seconds as a float, got {type(value).__name__}")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name}: must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: must be {'>=' if allow_zero else '>'} 0 seconds, got {value!r}")


def _integer(name: str, value: object, *, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def _name(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name}: must not be empty")


def _check_redis(value: object) -> None:
    if isinstance(value, aioredis.Redis | RedisCluster):
        return
    if isinstance(value, str):
        schemes = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
        if not value.startswith(schemes):
            raise ValueError(
                f"redis: {value!r} is not a Redis URL (redis://, rediss://, unix://, "
                "or redis+cluster:// / rediss+cluster:// for a Redis Cluster)"
            )
        return
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise TypeError(
        f"redis: expected a redis.asyncio.Redis, a redis.asyncio.cluster.RedisCluster "
        f"or a URL, got {kind}"
    )


def _check_network(opts: Any) -> None:
    if not isinstance(opts.backoff, Backoff):
        raise TypeError(f"backoff: expected a streamq.Backoff, got {type(opts.backoff).__name__}")
    _integer("network_retry", opts.network_retry)
    _seconds("command_timeout", opts.command_timeout, allow_zero=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerOptions:
    """Everything that configures an :class:`~streamq.AsyncConsumer`.

    Durations are seconds as ``float``. Only ``redis``, ``group`` and ``consumer``
    are required; the defaults suit production.

    Args:
        redis: The Redis to read from (client or URL; see :data:`RedisLike`).
        group: The consumer group's name (created if missing).
        consumer: This consumer's name inside the group. Keep it stable across
            restarts (e.g. a pod name): a restarted consumer first re-processes
            what it had read but not acknowledged under that name.
        read_timeout: How long one ``XREADGROUP`` blocks waiting for new entries
            (default 2.0). ``0`` blocks until an entry arrives. Shorter values make
            no difference to shutdown speed (the read is cancelled) but cost idle
            round trips.
        handler_timeout: Seconds after which a running handler is cancelled and
            the message retried (default 30.0). ``0``: no limit.
        pending_timeout: Seconds an entry may sit unacknowledged (idle) before
            another consumer of the group may claim it (default 60.0). Entries this
            consumer holds are renewed, so only entries of dead consumers idle that
            long.
        claim_interval: Seconds between claim rounds that take over idle entries of
            dead consumers (default 5.0). ``0`` never claims.
        max_retry: Retries before a message is dead-lettered (default 5): the handler
            runs at most ``max_retry + 1`` times. ``< 0`` never dead-letters.
        concurrency: Handlers running at once (default 10). ``0`` means 1. With 1,
            messages of a stream are handled in the order Redis delivers them.
        buffer_size: Messages read ahead of the handlers (default 100); the reader
            never asks Redis for more than the buffer can take. ``0``: no read-ahead,
            a message is read only when a handler is free to take it. Messages
            waiting for a retry do not count against it: they keep only their
            stream, ID and delivery count (a few hundred bytes each, the entry is
            read again when its retry falls due), and at most
            ``max(10_000, 100 * (buffer_size + concurrency))`` of them wait at once
            (11,000 with the defaults); beyond that, reading pauses until retries
            fall due.
        backoff: Policy for handler retries and network retries (default
            ``Backoff()``: 0.1 s doubling to 10 s).
        network_retry: Retries of a failed Redis operation before it becomes fatal
            (default 20, about two and a half minutes with the default backoff).
            ``0`` never retries, ``< 0`` retries forever.
        command_timeout: Seconds to wait for Redis to answer an ordinary command
            before the connection is considered stalled and the command retried
            (default 10.0). Blocking reads wait ``read_timeout`` plus this, and
            at least ``read_timeout`` + 1 s (Redis answers an expired block up to
            100 ms late).
        start_id: Where a group that streamq creates starts: ``"$"`` (default: only
            entries added after the group exists), ``"0"`` (the whole history), or
            an entry ID. With ``"$"``, entries published before the first consumer
            started are never seen by this group.
        dead_letter_stream: Where exhausted messages go when the subscription has no
            dead-letter handler: a template with ``{stream}`` (default
            ``"{stream}:dead"``). ``None`` drops them after reporting (the Go
            original's behaviour; data is lost).
        shutdown_timeout: Seconds ``aclose()`` waits for running handlers before
            cancelling them (default 10.0).
        error_buffer: Errors kept for ``errors()`` when nobody reads them fast enough
            (default 1000); older ones are dropped and counted, never blocking.
        middleware: Callables wrapping every handler call, outermost first (used
            for tracing and metrics).
        prune_consumers_after: Delete the other consumers of the group that have
            been idle this many seconds and hold no pending entries (default 0:
            never). For deployments whose consumer names come and go (pod names):
            without it the group keeps every consumer it ever saw. The check and
            the ``XGROUP DELCONSUMER`` run atomically in a Lua script, so no
            pending entry is ever dropped; a quiet consumer that was deleted is
            recreated by its next read. Must exceed ``read_timeout``, which live
            consumers are never idler than (so ``read_timeout=0``, blocking until an
            entry arrives, is refused with it). Needs ``eval``, ``xinfo|consumers``,
            ``exists`` and ``xgroup|delconsumer`` in an ACL.
    """

    redis: RedisLike
    group: str
    consumer: str
    read_timeout: float = 2.0
    handler_timeout: float = 30.0
    pending_timeout: float = 60.0
    claim_interval: float = 5.0
    max_retry: int = 5
    concurrency: int = 10
    buffer_size: int = 100
    backoff: Backoff = field(default_factory=Backoff)
    network_retry: int = 20
    command_timeout: float = 10.0
    start_id: str = "$"
    dead_letter_stream: str | None = "{stream}:dead"
    shutdown_timeout: float = 10.0
    error_buffer: int = 1000
    middleware: tuple[HandlerMiddleware, ...] = ()
    prune_consumers_after: float = 0.0

    def __post_init__(self) -> None:
        _check_redis(self.redis)
        _name("group", self.group)
        _name("consumer", self.consumer)
        _seconds("read_timeout", self.read_timeout)
        if 0 < self.read_timeout < 0.001:
            raise ValueError(
                f"read_timeout: Redis blocks in whole milliseconds; {self.read_timeout!r} "
                "is below 0.001 (use 0 to block until an entry arrives)"
            )
        _seconds("handler_timeout", self.handler_timeout)
        _seconds("pending_timeout", self.pending_timeout)
        _seconds("claim_interval", self.claim_interval)
        _seconds("shutdown_timeout", self.shutdown_timeout)
        _seconds("prune_consumers_after", self.prune_consumers_after)
        if self.prune_consumers_after > 0 and not (
            0 < self.read_timeout < self.prune_consumers_after
        ):
            raise ValueError(
                f"prune_consumers_after: {self.prune_consumers_after!r} s must exceed "
                f"read_timeout ({self.read_timeout!r} s, and read_timeout must be > 0): "
                "a live consumer waiting for entries would look idle"
            )
        _integer("max_retry", self.max_retry)
        _integer("concurrency", self.concurrency, minimum=0)
        _integer("buffer_size", self.buffer_size, minimum=0)
        _integer("error_buffer", self.error_buffer, minimum=1)
        _check_network(self)
        if self.claim_interval > 0:
            if self.pending_timeout == 0:
                raise ValueError(
                    "pending_timeout: must be > 0 while claiming is on (claim_interval > 0); "
                    "0 would claim entries that live consumers are still processing"
                )
            if 0 < self.pending_timeout < self.handler_timeout:
                raise ValueError(
                    f"pending_timeout: {self.pending_timeout!r} s is shorter than "
                    f"handler_timeout {self.handler_timeout!r} s while claiming is on; "
                    "messages still being handled would look abandoned"
                )
        _name("start_id", self.start_id)
        if not _START_RE.match(self.start_id):
            raise ValueError(f"start_id: expected '$', '0' or an entry ID, got {self.start_id!r}")
        if self.dead_letter_stream is not None:
            _name("dead_letter_stream", self.dead_letter_stream)
            try:
                self.dead_letter_stream.format(stream="x")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"dead_letter_stream: {self.dead_letter_stream!r} is not a template "
                    f"with only {{stream}} in it ({exc!r})"
                ) from None
        elif self.max_retry >= 0:
            warnings.warn(
                "dead_letter_stream=None: messages that exhaust max_retry on a stream "
                "without a dead-letter handler will be acknowledged and dropped",
                UserWarning,
                stacklevel=3,
            )
        if not isinstance(self.middleware, tuple) or not all(map(callable, self.middleware)):
            raise TypeError("middleware: expected a tuple of callables")

    @property
    def effective_concurrency(self) -> int:
        """``concurrency`` with the ``0 means 1`` rule applied."""
        return max(self.concurrency, 1)

    def dead_letter_stream_for(self, stream: str) -> str | None:
        """The dead-letter stream of ``stream``, or ``None`` when dead letters are dropped."""
        if self.dead_letter_stream is None:
            return None
        return self.dead_letter_stream.format(stream=stream)


@dataclass(frozen=True, slots=True, kw_only=True)
class PublisherOptions:
    """Everything that configures an :class:`~streamq.AsyncPublisher`.

    Args:
        redis: The Redis to write to (client or URL; see :data:`RedisLike`).
        stream_max_length: Cap each stream at about this many entries with
            ``XADD MAXLEN`` (default 0: no cap). Plain ``MAXLEN`` deletes the oldest
            entries whether or not a group has processed them; see ``safe_trim``.
        approximate_max_length: Use ``MAXLEN ~``, which trims in whole macro nodes
            and is much cheaper (default False).
        safe_trim: Never trim an entry that a consumer group of the stream has not
            read and acknowledged yet (default False). Each trim then uses
            ``MINID`` below the oldest entry any group still needs, so a stuck
            group lets the stream grow past ``stream_max_length``.
        backoff: Policy for network retries (default ``Backoff()``).
        network_retry: Retries of a failed publish before it raises (default 20).
            ``0`` never retries, ``< 0`` retries forever. A retried publish whose
            first attempt reached Redis before the connection broke is stored twice
            (at-least-once), unless ``idempotent`` is set.
        idempotent: Store each message once even when a publish is retried after
            an ambiguous network failure (default False). Every entry then carries
            a ``streamq-publish-id`` field with a value unique to that publish, and
            a retry first looks for the entries the lost attempt stored (an
            ``XREVRANGE`` over the entries added since) and resends only the
            others. Costs about 40 bytes per entry and nothing else until a retry.
        command_timeout: Seconds to wait for Redis to answer (default 10.0).
        error_buffer: Errors kept for ``errors()`` (default 1000).
        middleware: Callables that see (and may change) every message before it is
            sent, in order (used to inject trace context).
    """

    redis: RedisLike
    stream_max_length: int = 0
    approximate_max_length: bool = False
    safe_trim: bool = False
    backoff: Backoff = field(default_factory=Backoff)
    network_retry: int = 20
    command_timeout: float = 10.0
    error_buffer: int = 1000
    middleware: tuple[PublishMiddleware, ...] = ()
    idempotent: bool = False

    def __post_init__(self) -> None:
        _check_redis(self.redis)
        _integer("stream_max_length", self.stream_max_length, minimum=0)
        if not isinstance(self.idempotent, bool):
            raise TypeError(f"idempotent: expected a bool, got {type(self.idempotent).__name__}")
        if not isinstance(self.approximate_max_length, bool):
            raise TypeError("approximate_max_length: expected a bool")
        if not isinstance(self.safe_trim, bool):
            raise TypeError("safe_trim: expected a bool")
        if self.safe_trim and self.stream_max_length == 0:
            raise ValueError("safe_trim: needs stream_max_length > 0 (there is nothing to trim)")
        _integer("error_buffer", self.error_buffer, minimum=1)
        _check_network(self)
        if not isinstance(self.middleware, tuple) or not all(map(callable, self.middleware)):
            raise TypeError("middleware: expected a tuple of callables")
