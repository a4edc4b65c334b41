"""AsyncConsumer: reads a consumer group, runs handlers, acks, retries, claims, dead-letters.

How one consumer is put together (all tasks belong to one task group; the parts
share one :class:`~streamq._shared.Shared` state, whose :class:`~streamq._holding.Holding`
tracks every message the consumer holds):

* the **reader** (``_reader.py``) first re-reads this consumer's own pending
  entries (``XREADGROUP ... 0``), then new ones (``>``), never asking for more
  than the free capacity ``buffer_size + concurrency - held``;
* ``concurrency`` **workers** (``_worker.py``) take messages from an
  ``asyncio.Queue`` and run the handler under ``handler_timeout`` (an
  ``asyncio.timeout`` scope per worker that a lazily armed timer reschedules
  only when a handler is overdue, ``_deadline.py``), then ack, retry or
  dead-letter;
* the **acker** coalesces acknowledgements (``_acker.py``);
* the **retrier** (``_retrier.py``) holds failed messages until their backoff
  ends, without a worker and outside the buffer's capacity (only their IDs,
  under a limit of their own), then re-claims them to itself with ``XCLAIM``, so
  that Redis counts the delivery and returns the entry, and queues them again;
* the **renewer** resets the idle time of every entry this consumer holds, so
  that no other consumer claims what is merely waiting in the buffer or for a
  retry; the **claimer** takes over entries that idled past ``pending_timeout``
  (their consumer died) every ``claim_interval``; the **lease keeper** owns the
  ordered streams (all three in ``_claimer.py``); the **pruner** deletes idle
  consumers that hold nothing from the group, if asked (``_pruner.py``).

Recovered and claimed messages keep Redis' delivery counter at the number of
handler starts (``_deliveries.py``), so that a crash counts against the message
that was running, not against every message buffered beside it.

This module holds the public face: options, subscriptions, ``listen()``,
``aclose()``, ``stats()``, and the shutdown in phases.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from ._acker import Acker
from ._claimer import Claimer
from ._deliveries import Deliveries
from ._errors import ClosedError, StreamqError, convert
from ._errorstream import ErrorStream
from ._message import validate_stream_name
from ._options import ConsumerOptions
from ._partition import KEY_FIELD, PartitionedStream
from ._pruner import Pruner
from ._reader import Reader
from ._retrier import Retrier
from ._shared import Shared
from ._subscription import Handler, HandlerFunc, subscription
from ._transport import open_transport
from ._worker import Workers, handling

__all__ = ["AsyncConsumer", "ConsumerState", "ConsumerStats", "Handler", "HandlerFunc"]

logger = logging.getLogger("streamq")


class ConsumerState(enum.Enum):
    """Lifecycle of a consumer: NEW -> RUNNING -> CLOSING -> CLOSED."""

    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    """A snapshot of a consumer's counters and gauges.

    Counters count since ``listen()`` started; gauges are current values.

    Attributes:
        state: Where the consumer is in its lifecycle.
        read: Entries taken from Redis (read, recovered or claimed).
        handled: Handler calls that finished (any outcome).
        succeeded: Handler calls that succeeded (returned ``None`` or ``success()``).
        failed: Handler calls that failed (raised, timed out or returned ``fail()``).
        retried: Failed messages taken back for another attempt.
        discarded: Messages the handler discarded (acked without retry).
        dead_lettered: Messages moved to the dead-letter stream or handler.
        claimed: Entries claimed from other consumers after ``pending_timeout``.
        recovered: This consumer's own pending entries re-read at start.
        lost: Pending entries whose data was trimmed away before handling.
        pruned: Idle consumers deleted from the group (``prune_consumers_after``).
        acked: Entry IDs whose ``XACK`` Redis confirmed; an ack resent after a
            lost reply counts once.
        in_flight: Handlers running now.
        buffered: Messages read and waiting for a worker.
        waiting_retry: Failed messages waiting out their backoff.
        pending_acks: Acks queued and not yet confirmed by Redis.
        errors_reported: Non-fatal errors reported (each also logged).
        errors_dropped: Reported errors dropped, oldest first, because the
            :meth:`AsyncConsumer.errors` buffer was full.
    """

    state: ConsumerState
    read: int
    handled: int
    succeeded: int
    failed: int
    retried: int
    discarded: int
    dead_lettered: int
    claimed: int
    recovered: int
    lost: int
    pruned: int
    acked: int
    in_flight: int
    buffered: int
    waiting_retry: int
    pending_acks: int
    errors_reported: int
    errors_dropped: int


class AsyncConsumer:
    """Processes messages of Redis streams through a consumer group, at least once.

    Build it with a :class:`ConsumerOptions` or the same fields as keywords::

        consumer = AsyncConsumer(redis=client, group="billing", consumer="worker-1")
        consumer.subscribe("orders", handle_order)
        async with consumer:          # listens in the background
            ...                       # until the block ends; then closes gracefully

    or run it in the foreground with ``await consumer.listen()`` and stop it with
    ``await consumer.aclose()`` from elsewhere.

    Raises:
        TypeError, ValueError: An option is invalid (the message names it).
    """

    def __init__(self, options: ConsumerOptions | None = None, /, **fields: Any) -> None:
        if options is None:
            options = ConsumerOptions(**fields)
        elif fields:
            raise TypeError("pass either a ConsumerOptions or keyword fields, not both")
        elif not isinstance(options, ConsumerOptions):
            raise TypeError(f"options: expected ConsumerOptions, got {type(options).__name__}")
        self.options = options
        self._state = ConsumerState.NEW
        self._errors = ErrorStream(options.error_buffer)
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._fatal: BaseException | None = None
        self._background: asyncio.Task[None] | None = None
        self._shared = shared = Shared(options, self._report, self._fail)
        self._subs = shared.subs
        self._holding = shared.holding
        # The running parts, built when listen() starts (they need the connections).
        self._acker: Acker | None = None
        self._workers: Workers | None = None

    # -- public API ---------------------------------------------------------

    @property
    def state(self) -> ConsumerState:
        """Where the consumer is in its lifecycle."""
        return self._state

    @property
    def streams(self) -> list[str]:
        """The subscribed streams, in subscription order."""
        return list(self._subs)

    def subscribe(
        self,
        stream: str | PartitionedStream,
        handler: HandlerFunc | Handler,
        dead_letter: HandlerFunc | Handler | None = None,
        *,
        ordered_by_key: bool = False,
    ) -> None:
        """Handle messages of ``stream`` with ``handler``.

        Args:
            stream: The stream's key, or a :class:`~streamq.PartitionedStream`
                (every partition is subscribed, with the same handlers).
            handler: ``async def handler(msg) -> Result | None`` or an object with
                such a ``handle_event`` method.
            dead_letter: Called instead of ``handler`` for messages that exhausted
                ``max_retry``. Without it they are appended to the dead-letter
                stream (``options.dead_letter_stream``) and acked.
            ordered_by_key: Handle messages that carry the same key (the
                partitioned stream's ``key_field``, ``"streamq-key"`` for a plain
                stream) one at a time, in stream order, including across retries:
                a failing message holds back the later messages of its key until it
                succeeds, is discarded or is dead-lettered (with ``max_retry < 0``,
                a message that never succeeds holds its key back for good).
                Different keys still run up to ``concurrency`` at once; messages
                without a key are not ordered. Each ordered stream (each partition)
                is leased to one consumer of the group at a time, so the order
                holds across the group; partitions are shared out evenly among
                the consumers that subscribe them.

        Raises:
            TypeError: A handler is not a coroutine function (or object with one).
            ValueError: ``stream`` is already subscribed or empty.
            ClosedError: The consumer already started or closed.
        """
        if isinstance(stream, PartitionedStream):
            taken = [key for key in stream.keys if key in self._subs]
            if taken:
                raise ValueError(
                    f"stream: {stream!r}: partition {taken[0]!r} is already subscribed"
                )
            for key in stream.keys:
                self.subscribe(key, handler, dead_letter)
                if ordered_by_key:
                    self._holding.lanes.fields[key] = stream.key_field
            if ordered_by_key:
                self._shared.leases.add(stream.name, list(stream.keys))
            return
        if self._state is not ConsumerState.NEW:
            raise ClosedError(f"subscribe({stream!r}): the consumer is already {self._state.value}")
        validate_stream_name(stream, "stream")
        if stream in self._subs:
            raise ValueError(
                f"stream: {stream!r} is already subscribed (one handler per stream; "
                "one dead-letter handler at most)"
            )
        self._subs[stream] = subscription(stream, handler, dead_letter, self.options.middleware)
        if ordered_by_key:
            self._holding.lanes.fields[stream] = KEY_FIELD
            self._shared.leases.add(stream, [stream])

    def errors(self) -> ErrorStream:
        """The non-fatal errors, as an async iterator that ends when the consumer closes.

        Nobody has to read it: it keeps the newest ``error_buffer`` errors, counts
        the rest as dropped, and every error is also logged to ``streamq``.
        """
        return self._errors

    def stats(self) -> ConsumerStats:
        """A snapshot of counters (read, handled, retried, ...) and gauges (in flight, ...)."""
        c = self._shared.counts
        workers = self._workers
        err = self._errors.statistics()
        return ConsumerStats(
            state=self._state,
            read=c["read"],
            handled=c["handled"],
            succeeded=c["succeeded"],
            failed=c["failed"],
            retried=c["retried"],
            discarded=c["discarded"],
            dead_lettered=c["dead_lettered"],
            claimed=c["claimed"],
            recovered=c["recovered"],
            lost=c["lost"],
            pruned=c["pruned"],
            acked=self._acker.acked if self._acker else 0,
            in_flight=workers.in_flight if workers else 0,
            buffered=self._holding.queue.qsize(),
            waiting_retry=len(self._holding.waiting),
            pending_acks=self._acker.pending if self._acker else 0,
            errors_reported=err.reported,
            errors_dropped=err.dropped,
        )

    async def listen(self) -> None:
        """Create the groups, then read, handle, ack, retry and claim until closed.

        Returns ``None`` after :meth:`aclose`. If the task running it is cancelled,
        it cleans up (flushes acks of finished handlers) and re-raises. With no
        subscriptions it returns at once.

        Raises:
            NetworkError: Redis stayed unreachable through ``network_retry`` retries.
            RedisError: Redis refused an operation for good (WRONGTYPE, NOPERM, ...).
            ClosedError: ``listen()`` was already called, or the consumer is closed.
            BaseException: A handler raised one that is not an ``Exception``
                (``KeyboardInterrupt``, ``SystemExit``, ...): it is re-raised as it
                is, not in an exception group, after the same cleanup as a
                cancellation (its message stays pending).
        """
        if self._state is not ConsumerState.NEW:
            raise ClosedError(f"listen(): the consumer is already {self._state.value}")
        self._state = ConsumerState.RUNNING
        try:
            if not self._subs:
                return
            await self._run()
        finally:
            self._state = ConsumerState.CLOSED
            self._errors.close()
            self._done.set()
        if self._fatal is not None:
            raise self._fatal

    async def aclose(self) -> None:
        """Stop gracefully; idempotent.

        Stops reading, lets running handlers finish (at most ``shutdown_timeout``
        seconds, then cancels them), acks what finished, and leaves everything
        else pending in Redis for the next start or another consumer. Returns
        within about ``shutdown_timeout`` (plus one ack round trip) even if a
        handler ignores cancellation. Called from one of this consumer's handlers
        (e.g. to stop after a given message), it requests the stop and returns at
        once: the shutdown waits for that very handler.
        """
        if self._state is ConsumerState.NEW:
            self._state = ConsumerState.CLOSED
            self._errors.close()
            self._done.set()
            return
        if self._state is ConsumerState.RUNNING:
            self._state = ConsumerState.CLOSING
        self._stop.set()
        if handling.get() is self._shared:
            # Waiting would deadlock until shutdown_timeout cancels the handler.
            return
        await self._done.wait()
        task = self._background
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved here; __aexit__ re-raises it

    async def __aenter__(self) -> AsyncConsumer:
        if self._state is not ConsumerState.NEW:
            raise ClosedError(f"the consumer is already {self._state.value}")
        # The background task is owned by this object: aclose() always awaits it.
        self._background = asyncio.create_task(self.listen(), name="streamq-consumer")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
        task = self._background
        if task is not None and task.done() and not task.cancelled():
            fatal = task.exception()
            if fatal is not None:
                raise fatal

    # -- running ------------------------------------------------------------

    def _report(self, error: StreamqError) -> None:
        self._errors.report(error)

    def _fail(self, exc: BaseException) -> None:
        """Record a fatal error and start shutting down."""
        if self._fatal is None:
            self._fatal = exc
        self._state = ConsumerState.CLOSING
        self._stop.set()

    async def _guard(self, coro: Awaitable[None]) -> None:
        """Run a background loop; any error in it stops the consumer instead of the group."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(convert(exc, "consumer"))

    async def _run(self) -> None:
        opts = self.options
        shared = self._shared
        shared.transport = transport = open_transport(opts.redis, opts.command_timeout)
        shared.acker = self._acker = acker = Acker(
            transport, opts.group, shared.retry, self._report
        )
        deliveries = Deliveries(shared)
        reader = Reader(shared, deliveries)
        claimer = Claimer(shared, deliveries, reader.reading)
        retrier = Retrier(shared)
        self._workers = workers = Workers(shared, deliveries, retrier)
        guard = self._guard
        try:
            async with asyncio.TaskGroup() as tg:
                background = [
                    tg.create_task(guard(reader.run()), name="streamq-reader"),
                    tg.create_task(guard(retrier.run()), name="streamq-retrier"),
                ]
                if opts.pending_timeout > 0:
                    background.append(
                        tg.create_task(guard(claimer.renew()), name="streamq-renewer")
                    )
                if opts.claim_interval > 0:
                    background.append(tg.create_task(guard(claimer.run()), name="streamq-claimer"))
                if opts.prune_consumers_after > 0:
                    pruner = Pruner(shared)
                    background.append(tg.create_task(guard(pruner.run()), name="streamq-pruner"))
                if shared.leases:
                    background.append(
                        tg.create_task(guard(claimer.keep_leases()), name="streamq-leases")
                    )
                ack_task = tg.create_task(guard(acker.run()), name="streamq-acker")
                tasks = [
                    tg.create_task(workers.run(i), name=f"streamq-worker-{i}")
                    for i in range(opts.effective_concurrency)
                ]
                graceful = False
                try:
                    await self._stop.wait()
                    graceful = True
                finally:
                    await self._shutdown(workers, tasks, background, ack_task, graceful=graceful)
        except BaseExceptionGroup as group:
            # Only a BaseException that is not an Exception gets here (a handler's
            # KeyboardInterrupt, SystemExit...): every Exception becomes a result
            # or a fatal error. Raise it as it was raised, not wrapped in a group.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            self._state = ConsumerState.CLOSING
            await claimer.release_leases()
            await transport.aclose()

    async def _shutdown(
        self,
        workers: Workers,
        worker_tasks: list[asyncio.Task[None]],
        background: list[asyncio.Task[None]],
        ack_task: asyncio.Task[None],
        *,
        graceful: bool,
    ) -> None:
        """Stop reading, drain running handlers, flush acks. Runs even when cancelled.

        A cancelled listen() (``graceful=False``) does not wait for running handlers:
        cancellation asks for a prompt stop; aclose() is the graceful one.
        """
        timeout = self.options.shutdown_timeout if graceful else 0.0
        deadline = time.monotonic() + timeout
        for task in background:
            task.cancel()
        # New messages stay in the queue, pending in Redis, for the next owner.
        await workers.drain(worker_tasks, deadline)
        # A handler that ignores cancellation must not hold shutdown hostage: wait a
        # moment for workers, then flush the acks of whatever finished regardless.
        remaining = [t for t in (*worker_tasks, *background) if not t.done()]
        if remaining:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait(remaining, timeout=max(deadline - time.monotonic(), 0.1))
        acker = self._shared.acker
        if acker.pending and not ack_task.done():
            # Let a batch already on the wire land: cancelled mid-flight it would be
            # sent again by the final flush, and Redis would count it as a no-op.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(self.options.command_timeout):
                    await acker.wait_idle()
        ack_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([ack_task], timeout=self.options.command_timeout)
        if acker.pending:
            # The final acks must be sent even if listen() itself is being cancelled.
            flush = asyncio.ensure_future(acker.flush())
            try:
                await asyncio.wait_for(asyncio.shield(flush), self.options.command_timeout * 3)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(flush, self.options.command_timeout * 3)
                raise
            except Exception as exc:
                self._report(convert(exc, "final XACK"))
        stuck = [t for t in worker_tasks if not t.done()]
        if stuck:
            logger.error(
                "streamq: %d handler(s) ignored cancellation at shutdown; their messages "
                "stay pending and the consumer stops waiting for them",
                len(stuck),
                # Every streamq record carries these, so log filters can rely on them.
                extra={"stream": None, "message_id": None, "error_type": None},
            )
            # The task group still waits for them, but aclose() must not: release it
            # now. Otherwise listen() sets _done once the connections are closed,
            # so that aclose() returning means the consumer has fully stopped.
            self._done.set()
