"""The retrier: failed messages wait out their backoff here, without a worker.

A waiting message keeps only its stream, ID and delivery count (see
``Holding.waiting``), so that waiting retries do not count against the buffer.
When a retry falls due, the retrier claims the message back to this consumer
with ``XCLAIM``, which also returns the entry again (and makes Redis count the
delivery, which is what ``max_retry`` and a crash count against), and queues it
for the workers. Retries falling due close together share one ``XCLAIM``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from typing import Any

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
        self._holding = shared.holding
        # (due time, tie-breaker, (stream, id)); the delivery count is in
        # Holding.waiting.
        self._heap: list[tuple[float, int, tuple[str, str]]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()

    def schedule(self, msg: Message, delay: float) -> None:
        """Queue ``msg`` again after ``delay`` seconds."""
        self._holding.to_retry(msg)
        heap = self._heap
        entry = (time.monotonic() + delay, next(self._seq), (msg.stream, msg.id))
        heapq.heappush(heap, entry)
        # The retrier sleeps until the earliest entry is due: only a new earliest
        # entry changes that. Waking it for every failure cost more than the retry.
        if heap[0] is entry:
            self._wake.set()

    async def run(self) -> None:
        """Re-claim and queue retries as they fall due, until cancelled."""
        heap = self._heap
        wake = self._wake
        holding = self._holding
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
            room = holding.room_for_retries()
            if room <= 0:
                # Twice the capacity is queued or running: wait for the workers.
                await holding.space_freed()
                continue
            due: dict[str, list[str]] = {}
            taken = 0
            while heap and heap[0][0] <= now and taken < room:
                stream, entry_id = heapq.heappop(heap)[2]
                due.setdefault(stream, []).append(entry_id)
                taken += 1
            # Reserved while their claims are in flight, so that reads size
            # themselves to what is left.
            holding.reserved += taken
            try:
                for stream, ids in due.items():
                    reply = await self._claim_back(stream, ids)
                    # No await from here to the end of _requeue: the reservation
                    # turns into held messages.
                    holding.reserved -= len(ids)
                    taken -= len(ids)
                    for entry_id in self._requeue(stream, ids, reply):
                        await self._shared.gone(stream, entry_id)
            finally:
                holding.reserved -= taken

    async def _claim_back(self, stream: str, ids: list[str]) -> list[Any]:
        """XCLAIM due retries back to this consumer (Redis counts the delivery)."""
        shared = self._shared
        opts = shared.options
        try:
            reply = await shared.retry.call(
                f"XCLAIM {stream}",
                shared.transport.execute,
                *("XCLAIM", stream, opts.group, opts.consumer, 0, *ids),
            )
        except StreamqError as exc:
            if exc.error is None or not is_nogroup(exc.error):
                raise
            # The group vanished with these entries in it: read them from the
            # stream and handle them again rather than lose them (their ack will
            # be a no-op). Deleted with the stream, they are reported lost.
            replies = await shared.transport.pipeline_retrying(
                f"XRANGE {stream}",
                [("XRANGE", stream, entry_id, entry_id) for entry_id in ids],
                shared.retry,
            )
            return [reply[0] for reply in replies if isinstance(reply, list) and reply]
        return list(reply or ())

    def _requeue(self, stream: str, ids: list[str], reply: list[Any]) -> list[str]:
        """Queue the retries claimed back; return the IDs of those deleted meanwhile."""
        holding = self._holding
        counts = self._shared.counts
        missing = set(ids)
        for entry in reply:
            if entry is None:
                # Redis 6.2's answer for a deleted entry (7.0+ omits it): its ID
                # stays missing.
                continue
            raw_id, fields = entry
            entry_id = raw_id.decode()
            if fields is None or entry_id not in missing:
                continue
            missing.discard(entry_id)
            counts["retried"] += 1
            holding.back_from_retry(stream, raw_id, fields)
        gone = [entry_id for entry_id in ids if entry_id in missing]
        for entry_id in gone:
            holding.retry_gone(stream, entry_id)
        return gone
