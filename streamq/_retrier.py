"""The retrier: failed messages wait out their backoff here, without a worker.

When a retry falls due, the retrier claims the message back to this consumer with
``XCLAIM`` (so that Redis counts the delivery, which is what ``max_retry`` and a
crash count against) and queues it for the workers again. Retries falling due
close together share one ``XCLAIM``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time

from ._errors import StreamqError, is_nogroup
from ._message import Message
from ._shared import Shared

__all__ = ["Retrier"]

# Seconds a due retry may wait for others to share its XCLAIM.
_RETRY_WINDOW = 0.002


class Retrier:
    """Holds failed messages until their backoff ends, then queues them again.

    Args:
        shared: The consumer's shared state.
    """

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._heap: list[tuple[float, int, Message]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()

    @property
    def waiting(self) -> int:
        """Messages waiting for their retry."""
        return len(self._heap)

    def schedule(self, msg: Message, delay: float) -> None:
        """Queue ``msg`` again after ``delay`` seconds."""
        heap = self._heap
        entry = (time.monotonic() + delay, next(self._seq), msg)
        heapq.heappush(heap, entry)
        # The retrier sleeps until the earliest entry is due: only a new earliest
        # entry changes that. Waking it for every failure cost more than the retry.
        if heap[0] is entry:
            self._wake.set()

    async def run(self) -> None:
        """Re-claim and queue retries as they fall due, until cancelled."""
        heap = self._heap
        wake = self._wake
        while True:
            now = time.monotonic()
            if not heap:
                wake.clear()
                await wake.wait()
                continue
            if heap[0][0] > now:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    # Up to _RETRY_WINDOW late, so that retries falling due close
                    # together share one XCLAIM instead of one round trip each.
                    async with asyncio.timeout(heap[0][0] - now + _RETRY_WINDOW):
                        await wake.wait()
                continue
            due: dict[str, list[Message]] = {}
            while heap and heap[0][0] <= now:
                msg = heapq.heappop(heap)[2]
                due.setdefault(msg.stream, []).append(msg)
            for stream, msgs in due.items():
                await self._reclaim(stream, msgs)

    async def _reclaim(self, stream: str, msgs: list[Message]) -> None:
        """Claim due retries back to this consumer (Redis counts the delivery) and queue them."""
        shared = self._shared
        holding = shared.holding
        opts = shared.options
        by_id = {m.id: m for m in msgs}
        try:
            reply = await shared.retry.call(
                f"XCLAIM {stream}",
                shared.transport.execute,
                *("XCLAIM", stream, opts.group, opts.consumer, 0, *by_id),
            )
        except StreamqError as exc:
            if exc.error is None or not is_nogroup(exc.error):
                raise
            # The group vanished with these entries in it: handle them again from
            # memory rather than lose them (their ack will be a no-op).
            for msg in msgs:
                msg._deliveries += 1
                holding.queue.put_nowait(msg)
            return
        for entry in reply or ():
            if entry is None:
                # Redis 6.2's answer for a deleted entry (7.0+ omits it): its ID
                # stays in by_id and is reported below.
                continue
            raw_id, fields = entry
            entry_id = raw_id.decode()
            old = by_id.pop(entry_id, None)
            if old is None:
                continue
            if fields is None:
                by_id[entry_id] = old  # deleted: handled below
                continue
            old._deliveries += 1
            shared.counts["retried"] += 1
            # Still held (counted in capacity); the queue always has room for it.
            holding.queue.put_nowait(old)
        for entry_id, msg in by_id.items():
            holding.release(msg)
            await shared.gone(stream, entry_id)
