"""The messages one consumer holds, and the capacity they take.

"Held" means read from Redis (or claimed) and not yet acked or abandoned: queued
for a worker, parked behind an earlier message of its key, running, or waiting
for a retry. Every held message is in the group's pending list under this
consumer's name, which is what makes a crash at any point safe; the renewer keeps
them all from idling, and the claimer never takes one.

Two bounds keep memory in check:

* **capacity** (``buffer_size + concurrency``): messages queued, parked or
  running, plus the reservations of reads and claims in flight. Readers and the
  claimer reserve the capacity a request may fill before awaiting Redis, and
  turn the reservation into held messages without an await in between. Retries
  falling due come back even into a full buffer (they have priority over new
  reads), up to a second capacity's worth.
* **retry limit** (``max(10_000, 100 * capacity)``): messages waiting out a
  retry backoff. They keep only their stream, ID and delivery count (the retrier
  reads the entry again when it claims it back), so they do not count against
  the capacity: failing messages never throttle reading. Once that many wait,
  reading and claiming pause until retries fall due. Messages already held then
  may still fail, so the limit can be exceeded by at most twice the capacity.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ._errors import MalformedMessageError, StreamqError
from ._message import FieldValue, Message
from ._ordering import KeyLanes

__all__ = ["Holding", "retry_limit"]


def retry_limit(capacity: int) -> int:
    """How many messages may wait for a retry before reading pauses (see the module)."""
    return max(10_000, 100 * capacity)


class Holding:
    """The held messages of one consumer, the queue the workers take them from, and its space.

    Args:
        capacity: Messages held and reserved at most (``buffer_size + concurrency``).
        counts: The consumer's counters (``read`` is counted here).
        report: Where a malformed entry is reported.

    Attributes:
        messages: Held messages (queued, parked or running) by ``(stream, id)``.
        waiting: Held messages waiting for a retry: their delivery count by
            ``(stream, id)``. With :attr:`messages`, what the renewer renews and
            the claimer must not take.
        reserved: Capacity promised to reads and claims in flight: their entries
            are not held yet, but will be.
        queue: Messages ready for a worker.
        lanes: Per-key ordering of the ordered streams.
        suspects: Recovered or claimed messages whose handler has not started here
            yet (see :class:`~streamq._deliveries.Deliveries`).
        raw_dead: Raw fields of malformed entries, dead-lettered as they are.
    """

    __slots__ = (
        "_counts",
        "_report",
        "_retry_limit",
        "capacity",
        "lanes",
        "messages",
        "queue",
        "raw_dead",
        "reserved",
        "space",
        "suspects",
        "waiting",
    )

    def __init__(
        self, capacity: int, counts: dict[str, int], report: Callable[[StreamqError], None]
    ) -> None:
        self.capacity = capacity
        self._counts = counts
        self._report = report
        self.messages: dict[tuple[str, str], Message] = {}
        self.waiting: dict[tuple[str, str], int] = {}
        self._retry_limit = retry_limit(capacity)
        self.reserved = 0
        # Unbounded on purpose: the capacity and the room for retries bound what is
        # queued; a bounded queue would raise QueueFull in put_nowait and kill
        # the consumer.
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        # Set whenever capacity may have been freed.
        self.space = asyncio.Event()
        self.lanes = KeyLanes()
        self.suspects: set[tuple[str, str]] = set()
        self.raw_dead: dict[tuple[str, str], list[Any]] = {}

    def free(self) -> int:
        """Capacity neither held nor reserved (none while the retry limit is reached)."""
        if len(self.waiting) >= self._retry_limit:
            return 0
        return self.capacity - len(self.messages) - self.reserved

    def room_for_retries(self) -> int:
        """How many retries falling due may come back now (up to twice the capacity)."""
        return 2 * self.capacity - len(self.messages) - self.reserved

    def holds(self, key: tuple[str, str]) -> bool:
        """Whether the entry ``(stream, id)`` is held (including waiting for a retry)."""
        return key in self.messages or key in self.waiting

    async def wait_for_space(self, minimum: int = 1) -> int:
        """Wait until at least ``minimum`` is free; return what is free."""
        while True:
            free = self.free()
            if free >= minimum:
                return free
            await self.space_freed()

    async def space_freed(self) -> None:
        """Wait until capacity may have been freed."""
        self.space.clear()
        await self.space.wait()

    def release(self, msg: Message) -> None:
        """Forget a held message (acked, dead-lettered or abandoned)."""
        self.suspects.discard((msg.stream, msg.id))
        if self.messages.pop((msg.stream, msg.id), None) is not None:
            self.space.set()
            if self.lanes.fields:
                after = self.lanes.done(msg)
                if after is not None:
                    self.queue.put_nowait(after)

    def to_retry(self, msg: Message) -> None:
        """``msg`` failed and waits for a retry: keep only its ID and delivery count.

        It stays at the head of its key's lane, if ordered, so that later messages
        of the key wait for it.
        """
        key = (msg.stream, msg.id)
        if self.messages.pop(key, None) is not None:
            self.waiting[key] = msg._deliveries
            self.space.set()

    def back_from_retry(self, stream: str, raw_id: bytes, fields: Any) -> None:
        """A retry was claimed back (the entry read again from Redis): queue it for the workers.

        Its delivery count goes up by one: the claim counted a delivery in Redis.
        """
        entry_id = raw_id.decode()
        key = (stream, entry_id)
        deliveries = self.waiting.pop(key, None)
        if deliveries is None:
            return
        # Below the retry limit again: reading may resume.
        self.space.set()
        try:
            # As in admit_entries: the field names decoded in C.
            it = iter(fields)
            values: dict[str, FieldValue] = dict(zip(map(bytes.decode, it), it, strict=True))
        except (UnicodeDecodeError, ValueError, TypeError):
            self.make(stream, raw_id, fields, deliveries + 1)  # holds it for dead-lettering
            return
        msg = Message._received(stream, entry_id, values, deliveries + 1)
        # Not through the lanes: it still heads its key's lane.
        self.messages[key] = msg
        self.queue.put_nowait(msg)

    def retry_gone(self, stream: str, entry_id: str) -> None:
        """Forget a message waiting for a retry whose entry could not be claimed back."""
        if self.waiting.pop((stream, entry_id), None) is None:
            return
        self.space.set()
        if stream in self.lanes.fields:
            after = self.lanes.drop(stream, entry_id)
            if after is not None:
                self.queue.put_nowait(after)

    def admit(self, msg: Message) -> None:
        """Hold ``msg`` and queue it for the workers (or park it behind its key)."""
        key = (msg.stream, msg.id)
        if key in self.messages or key in self.waiting:
            return
        self.messages[key] = msg
        if self.lanes.fields and not self.lanes.admit(msg):
            return  # parked behind an earlier message of its key
        self.queue.put_nowait(msg)

    def admit_entries(self, stream: str, entries: list[Any]) -> None:
        """Admit the entries of one read (first deliveries): the read path's inner loop.

        Equivalent to :meth:`make` then :meth:`admit` for each entry, in one pass
        with the lookups hoisted and the field names decoded in C
        (``dict(zip(map(bytes.decode, it), it))``); about 0.5 us less per message.
        Anything unusual (malformed fields, ordering lanes) takes the general path.
        """
        self._counts["read"] += len(entries)
        if self.lanes.fields:
            for raw_id, fields in entries:
                msg = self.make(stream, raw_id, fields, 1)
                if msg is not None:
                    self.admit(msg)
            return
        held = self.messages
        put = self.queue.put_nowait
        received = Message._received
        decode = bytes.decode
        for raw_id, fields in entries:
            try:
                entry_id = decode(raw_id)
                it = iter(fields)
                values: dict[str, FieldValue] = dict(zip(map(decode, it), it, strict=True))
            except (UnicodeDecodeError, ValueError, TypeError):
                msg = self.make(stream, raw_id, fields, 1)  # reports it
                if msg is not None:
                    self.admit(msg)
                continue
            key = (stream, entry_id)
            if key in held:
                continue
            msg = received(stream, entry_id, values, 1)
            held[key] = msg
            put(msg)

    def make(self, stream: str, raw_id: Any, fields: Any, deliveries: int) -> Message | None:
        """Turn one raw entry into a Message; report and hold for dead-lettering what cannot be.

        A malformed entry (field names that are not UTF-8) is held and queued
        with no values; its raw fields wait in :attr:`raw_dead` for the worker,
        which dead-letters it untouched. ``None`` is returned for it.
        """
        entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        try:
            it = iter(fields)
            values: dict[str, FieldValue] = {k.decode(): v for k, v in zip(it, it, strict=True)}
        except (UnicodeDecodeError, ValueError, AttributeError, TypeError) as exc:
            raw = Message._received(stream, entry_id, {}, deliveries)
            self._report(
                MalformedMessageError(
                    f"entry {entry_id} of {stream!r} has fields that are not UTF-8 names "
                    f"({exc}); dead-lettering it untouched",
                    message=raw,
                    error=exc,
                )
            )
            self.messages[(stream, entry_id)] = raw
            self.raw_dead[(stream, entry_id)] = list(fields or ())
            self.queue.put_nowait(raw)
            return None
        return Message._received(stream, entry_id, values, deliveries)
