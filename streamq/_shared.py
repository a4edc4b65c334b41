"""What the parts of one consumer (reader, claimer, retrier, workers) share."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._errors import MessageLostError, StreamqError
from ._holding import Holding
from ._leases import Leases
from ._retry import NetworkRetry

if TYPE_CHECKING:
    from ._acker import Acker
    from ._options import ConsumerOptions
    from ._subscription import Subscription
    from ._transport import Transport

__all__ = ["COUNTERS", "Shared"]

# The counters of ConsumerStats that the parts count into `Shared.counts`.
COUNTERS = (
    "read",
    "handled",
    "succeeded",
    "failed",
    "retried",
    "discarded",
    "dead_lettered",
    "claimed",
    "recovered",
    "lost",
    "pruned",
)


class Shared:
    """The state of one consumer that its parts share, and the operations all of them use.

    Args:
        options: The consumer's options.
        report: Reports a non-fatal error (to ``errors()`` and the log).
        fail: Records a fatal error and starts shutting the consumer down.

    Attributes:
        subs: The subscriptions by stream.
        counts: The counters of :class:`~streamq.ConsumerStats`.
        holding: The held messages and their capacity.
        leases: The leased (ordered) streams.
        retry: The network retry policy of every Redis operation.
        started: Set once the reader recovered this consumer's own pending
            entries; claiming and renewing wait for it.
        transport: streamq's connections (set when the consumer starts).
        acker: The ack batcher (set when the consumer starts).
    """

    transport: Transport
    acker: Acker

    def __init__(
        self,
        options: ConsumerOptions,
        report: Callable[[StreamqError], None],
        fail: Callable[[BaseException], None],
    ) -> None:
        self.options = options
        self.report = report
        self.fail = fail
        self.subs: dict[str, Subscription] = {}
        self.counts = dict.fromkeys(COUNTERS, 0)
        capacity = options.buffer_size + options.effective_concurrency
        self.holding = Holding(capacity, self.counts, report)
        self.leases = Leases(options.group, options.consumer, options.pending_timeout or 60.0)
        self.retry = NetworkRetry(options.backoff, options.network_retry, report)
        self.started = asyncio.Event()

    def lost(self, stream: str, entry_id: str) -> None:
        """Report an entry deleted from the stream while pending, and ack it away."""
        self.counts["lost"] += 1
        self.report(
            MessageLostError(
                f"entry {entry_id} of {stream!r} was deleted from the stream (trimmed?) "
                "before it was processed; removing it from the pending list",
                stream=stream,
                entry_id=entry_id,
            )
        )
        self.acker.add(stream, entry_id)

    async def gone(self, stream: str, entry_id: str) -> None:
        """An entry could not be claimed: trimmed (report it) or taken by another consumer."""
        found = await self.retry.call(
            f"XRANGE {stream}", self.transport.execute, "XRANGE", stream, entry_id, entry_id
        )
        if not found:
            self.lost(stream, entry_id)
