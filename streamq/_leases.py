"""Exclusive partitions for ordered subscriptions: one consumer of a group reads each.

Per-key ordering (``ordered_by_key=True``) works by one consumer handling the
messages of a key one after the other. Redis hands the entries of a stream to
whichever consumer of the group asks next, so with several consumers two of them
would run messages of one key at once. An ordered stream (each partition of an
ordered :class:`~streamq.PartitionedStream`) is therefore **leased** to one
consumer of the group at a time, the way Kafka assigns a partition to one member
of a consumer group; the others do not read or claim it.

Keys (all single-key commands, so any of them may live on any cluster node):

* ``<stream>:lease:<group>``: the owner's consumer name, with a time to live of
  ``pending_timeout`` (60 s by default), renewed every third of it (at most every
  2 s). A partition's lease key shares the partition's hash tag and slot.
* ``<name>:members:<group>``: a sorted set of the consumers reading the ordered
  stream ``<name>``, each scored with the time its membership expires (its
  client's clock; keep clocks within a few seconds).

Balance: every tick a consumer lists the live members ``m`` and aims at owning
``N // m`` of the ``N`` partitions, one more if its name ranks among the first
``N % m``, taking free leases (``SET NX``) or handing back extras. A consumer
that joins gets its share within a tick or two; one that stops cleanly
(``aclose()``) hands its partitions back at once; one that crashes loses them
when its leases expire, after ``pending_timeout``. With more consumers than
partitions, the extra consumers own none and wait as standbys.

Handover keeps the order: the old owner stops reading the partition, finishes
(acks or dead-letters) every message of it that it holds, and only then deletes
the lease. A new owner first claims every entry of the partition that is still
pending for another consumer (those of a crashed owner), and only then reads new
ones. The one case where two consumers can run messages of one key at once is a
consumer stalled (not crashed) for longer than ``pending_timeout``: its lease
expires while it still holds messages, as with any lease without fencing.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._errors import LeaseLostError, StreamqError

if TYPE_CHECKING:
    from ._retry import NetworkRetry
    from ._transport import Transport

__all__ = ["Leases"]

# Renew only a lease still held by us, and delete only our own.
_RENEW = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)
_RELEASE = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


@dataclass(slots=True)
class _Set:
    members_key: str
    partitions: list[str]
    target: int = 0


@dataclass(slots=True)
class Leases:
    """The ordered streams of one consumer and which of them it owns.

    Attributes:
        exclusive: Every stream read under a lease.
        owned: Leased streams this consumer reads now.
        taking: Leased streams whose entries pending elsewhere are being claimed;
            read once that is done.
        releasing: Leased streams it no longer reads and hands back once drained.
    """

    group: str
    consumer: str
    ttl: float
    exclusive: set[str] = field(default_factory=set)
    owned: set[str] = field(default_factory=set)
    taking: set[str] = field(default_factory=set)
    releasing: set[str] = field(default_factory=set)
    _sets: list[_Set] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, name: str, partitions: list[str]) -> None:
        """Read ``partitions`` (one ordered stream called ``name``) under leases."""
        self._sets.append(_Set(f"{name}:members:{self.group}", list(partitions)))
        self.exclusive.update(partitions)

    def __bool__(self) -> bool:
        return bool(self._sets)

    def readable(self, stream: str) -> bool:
        """Whether this consumer may read (and claim in) ``stream`` now."""
        return stream not in self.exclusive or stream in self.owned

    @property
    def changed(self) -> asyncio.Event:
        """An event set at the next change of the owned set (a new one after each)."""
        return self._changed

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def lease_key(self, stream: str) -> str:
        """The key of ``stream``'s lease in this group."""
        return f"{stream}:lease:{self.group}"

    @property
    def interval(self) -> float:
        """Seconds between two ticks."""
        return max(min(self.ttl / 3, 2.0), 0.05)

    async def run(
        self,
        transport: Transport,
        retry: NetworkRetry,
        busy: Callable[[str], bool],
        take_over: Callable[[str], Awaitable[None]],
        report: Callable[[StreamqError], None],
    ) -> None:
        """Keep the leases until cancelled (see the module documentation).

        Args:
            transport: Where to send the commands.
            retry: The consumer's network retry layer.
            busy: Whether the consumer still holds or reads messages of a stream.
            take_over: Claims every entry of a newly leased stream that is pending
                for another consumer (waiting for capacity as needed).
            report: Where lost leases are reported.
        """

        async def take(stream: str) -> None:
            await take_over(stream)
            if stream in self.taking:
                self.taking.discard(stream)
                self.owned.add(stream)
                self._signal()

        # Join first and look again a moment later: consumers started together then
        # see each other before taking partitions, and split them at once.
        await self._join(transport, retry)
        await asyncio.sleep(min(self.interval / 2, 0.25))
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    acquired = await self.tick(transport, retry, busy, report)
                    for stream in acquired:
                        # Its own task: a long take-over must not delay renewals.
                        tg.create_task(take(stream), name=f"streamq-take-over-{stream}")
                    await asyncio.sleep(self.interval)
        except ExceptionGroup as group:
            raise group.exceptions[0] from None

    async def tick(
        self,
        transport: Transport,
        retry: NetworkRetry,
        busy: Callable[[str], bool],
        report: Callable[[StreamqError], None],
    ) -> list[str]:
        """One round: membership, renewals, hand-backs and acquisitions.

        Returns:
            The streams leased in this round (now in :attr:`taking`).
        """
        ttl_ms = max(round(self.ttl * 1000), 1)
        await self._join(transport, retry)
        held = sorted(self.owned | self.taking | self.releasing)
        if held:
            renewals = [("EVAL", _RENEW, 1, self.lease_key(p), self.consumer, ttl_ms) for p in held]
            replies = await transport.pipeline_retrying("lease renewal", renewals, retry)
            for stream, reply in zip(held, replies, strict=True):
                if reply == 1:
                    continue
                if isinstance(reply, BaseException):
                    raise reply
                self.owned.discard(stream)
                self.taking.discard(stream)
                self.releasing.discard(stream)
                self._signal()
                report(
                    LeaseLostError(
                        f"the lease of {stream!r} expired and another consumer of group "
                        f"{self.group!r} may have taken it: messages of one key may run "
                        "twice or out of order (was this consumer stalled for longer than "
                        "pending_timeout?)"
                    )
                )
        for s in self._sets:
            mine = [p for p in s.partitions if p in self.owned]
            # Hand back the extras beyond the fair share, the last ones first.
            for stream in mine[s.target :]:
                self.owned.discard(stream)
                self.releasing.add(stream)
                self._signal()
        for stream in sorted(self.releasing):
            if busy(stream):
                continue
            # Nothing held; Redis must also show nothing pending for us there: an
            # ack not yet confirmed would otherwise be claimed and run again by the
            # next owner, after newer messages of its key.
            rows = await retry.call(
                f"XPENDING {stream}",
                transport.execute,
                *("XPENDING", stream, self.group, "-", "+", 1, self.consumer),
            )
            if not rows:
                await retry.call(
                    "lease release",
                    transport.execute,
                    "EVAL",
                    _RELEASE,
                    1,
                    self.lease_key(stream),
                    self.consumer,
                )
                self.releasing.discard(stream)
        acquired: list[str] = []
        for s in self._sets:
            acquired += await self._acquire(s, transport, retry, ttl_ms)
        return acquired

    async def _join(self, transport: Transport, retry: NetworkRetry) -> None:
        """Renew this consumer's membership and size its share of each ordered stream."""
        ttl_ms = max(round(self.ttl * 1000), 1)
        now_ms = round(time.time() * 1000)
        for s in self._sets:
            replies = await retry.call(
                f"ZADD {s.members_key}",
                transport.pipeline,
                [
                    ("ZADD", s.members_key, now_ms + ttl_ms, self.consumer),
                    ("ZREMRANGEBYSCORE", s.members_key, "-inf", now_ms),
                    ("PEXPIRE", s.members_key, ttl_ms * 2),
                    ("ZRANGE", s.members_key, 0, -1),
                ],
            )
            raw = replies[3] if isinstance(replies[3], list) else []
            members = sorted({m.decode() if isinstance(m, bytes) else str(m) for m in raw})
            if self.consumer not in members:
                members = sorted([*members, self.consumer])
            # An even split by rank in name order: N // m each, one more for the
            # first N % m. Every member computes the same shares, which add up to N.
            n, m = len(s.partitions), len(members)
            s.target = n // m + (1 if members.index(self.consumer) < n % m else 0)

    async def _acquire(
        self, s: _Set, transport: Transport, retry: NetworkRetry, ttl_ms: int
    ) -> list[str]:
        mine = self.owned | self.taking | self.releasing
        have = sum(1 for p in s.partitions if p in mine)
        n = len(s.partitions)
        # Start at a place of our own, so that consumers starting together mostly
        # try different partitions first.
        first = zlib.crc32(self.consumer.encode()) % n
        acquired: list[str] = []
        for i in range(n):
            if have >= s.target:
                break
            stream = s.partitions[(first + i) % n]
            if stream in mine:
                continue
            key = self.lease_key(stream)
            got = await retry.call(
                f"SET {key}",
                transport.execute,
                *("SET", key, self.consumer, "NX", "PX", ttl_ms),
            )
            if got is None:
                owner = await retry.call(f"GET {key}", transport.execute, "GET", key)
                if owner != self.consumer.encode():
                    continue
                # Ours already (this consumer restarted under the same name).
            self.taking.add(stream)
            acquired.append(stream)
            have += 1
        return acquired

    async def release_all(self, transport: Transport) -> None:
        """Hand every lease back and leave the membership (at shutdown; one attempt)."""
        mine = sorted(self.owned | self.taking | self.releasing)
        self.owned.clear()
        self.taking.clear()
        self.releasing.clear()
        commands: list[tuple[str | int, ...]] = [
            ("EVAL", _RELEASE, 1, self.lease_key(p), self.consumer) for p in mine
        ]
        commands += [("ZREM", s.members_key, self.consumer) for s in self._sets]
        if commands:
            await transport.pipeline(commands)
