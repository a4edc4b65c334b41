"""Redis' delivery counters of the entries a consumer recovers or claims.

Redis counts a delivery each time an entry is read back or claimed, whether or
not a handler ever ran on it. For a message recovered (re-read after a restart)
or claimed (taken over from a dead consumer), streamq keeps the counter at the
number of handler starts instead: re-reading and claiming set it back to what
it was, and the worker counts one start right before the handler runs. A message
that kills its process is then dead-lettered after ``max_retry + 1`` starts,
while the messages buffered beside it when it struck are not charged for the
crashes. Such messages are *suspects* until their handler starts here.
"""

from __future__ import annotations

from typing import Any

from ._message import Message
from ._shared import Shared

__all__ = ["Deliveries"]


class Deliveries:
    """Reads and sets the delivery counters of this consumer's pending entries.

    Args:
        shared: The consumer's shared state.
    """

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._suspects = shared.holding.suspects

    async def start_suspect(self, msg: Message) -> None:
        """Count, in Redis, a handler start on a recovered or claimed message."""
        self._suspects.discard((msg.stream, msg.id))
        msg._deliveries += 1
        await self.set(msg.stream, {msg.id: msg._deliveries})

    async def set(self, stream: str, counts: dict[str, int]) -> None:
        """Set the delivery counters of this consumer's pending entries.

        ``XCLAIM ... RETRYCOUNT n JUSTID`` to itself: the entry stays where it is.
        An entry gone from the group (acked, or the group vanished) is skipped.
        """
        shared = self._shared
        opts = shared.options
        commands = [
            ("XCLAIM", stream, opts.group, opts.consumer, 0, *ids, "RETRYCOUNT", n, "JUSTID")
            for n, ids in _by_count(counts).items()
        ]
        if commands:
            await shared.transport.pipeline_retrying(f"XCLAIM {stream}", commands, shared.retry)

    async def read(self, stream: str, first: str, last: str, count: int) -> dict[str, int]:
        """The delivery counters of this consumer's pending entries between two IDs."""
        shared = self._shared
        opts = shared.options
        reply = await shared.retry.call(
            f"XPENDING {stream}",
            shared.transport.execute,
            *("XPENDING", stream, opts.group, first, last, count, opts.consumer),
        )
        return {row[0].decode(): int(row[3]) for row in reply or ()}

    async def claim(
        self, stream: str, idle_ms: int, wanted: list[str], counts: dict[str, int]
    ) -> list[Any]:
        """XCLAIM ``wanted`` to this consumer, keeping each one's delivery counter.

        Claiming is not a handler start, so the counter is set back to what it
        was (``RETRYCOUNT``): one XCLAIM per distinct count, usually a single one.
        Returns the claimed entries (``[raw_id, fields]``, as Redis answers).
        """
        shared = self._shared
        opts = shared.options
        reply: list[Any] = []
        for n, ids in _by_count({entry_id: counts[entry_id] for entry_id in wanted}).items():
            part = await shared.retry.call(
                f"XCLAIM {stream}",
                shared.transport.execute,
                *("XCLAIM", stream, opts.group, opts.consumer, idle_ms, *ids, "RETRYCOUNT", n),
            )
            reply.extend(part or ())
        return reply


def _by_count(counts: dict[str, int]) -> dict[int, list[str]]:
    by_value: dict[int, list[str]] = {}
    for entry_id, n in counts.items():
        by_value.setdefault(n, []).append(entry_id)
    return by_value
