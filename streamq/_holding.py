"""The messages one consumer holds, and the capacity they take.

"Held" means read from Redis (or claimed) and not yet acked or abandoned: queued
for a worker, parked behind an earlier message of its key, running, or waiting
for a retry. Every held message is in the group's pending list under this
consumer's name, which is what makes a crash at any point safe; the renewer keeps
them all from idling, and the claimer never takes one.

At most ``buffer_size + concurrency`` messages are held or reserved at once:
readers and the claimer reserve the capacity a request may fill before awaiting
Redis, and turn the reservation into held messages without an await in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ._errors import MalformedMessageError, StreamqError
from ._message import FieldValue, Message
from ._ordering import KeyLanes

__all__ = ["Holding"]


class Holding:
    """The held messages of one consumer, the queue the workers take them from, and its space.

    Args:
        capacity: Messages held and reserved at most (``buffer_size + concurrency``).
        counts: The consumer's counters (``read`` is counted here).
        report: Where a malformed entry is reported.

    Attributes:
        messages: Every held message by ``(stream, id)``: what the renewer renews
            and the claimer must not take.
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
        "capacity",
        "lanes",
        "messages",
        "queue",
        "raw_dead",
        "reserved",
        "space",
        "suspects",
    )

    def __init__(
        self, capacity: int, counts: dict[str, int], report: Callable[[StreamqError], None]
    ) -> None:
        self.capacity = capacity
        self._counts = counts
        self._report = report
        self.messages: dict[tuple[str, str], Message] = {}
        self.reserved = 0
        # Unbounded on purpose: the reader and the claimer each size their request
        # to the free capacity before awaiting Redis, so together they may
        # overshoot it by one batch. `messages` bounds memory; a bounded queue would raise
        # QueueFull in put_nowait and kill the consumer.
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        # Set whenever capacity may have been freed.
        self.space = asyncio.Event()
        self.lanes = KeyLanes()
        self.suspects: set[tuple[str, str]] = set()
        self.raw_dead: dict[tuple[str, str], list[Any]] = {}

    def free(self) -> int:
        """Capacity neither held nor reserved."""
        return self.capacity - len(self.messages) - self.reserved

    async def wait_for_space(self, minimum: int = 1) -> int:
        """Wait until at least ``minimum`` is free; return what is free."""
        while True:
            free = self.free()
            if free >= minimum:
                return free
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

    def admit(self, msg: Message) -> None:
        """Hold ``msg`` and queue it for the workers (or park it behind its key)."""
        key = (msg.stream, msg.id)
        if key in self.messages:
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
