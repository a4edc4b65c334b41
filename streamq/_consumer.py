"""AsyncConsumer: reads a consumer group, runs handlers, acks, retries, claims, dead-letters.

How one consumer is put together (all tasks belong to one task group):

* the **reader** first re-reads this consumer's own pending entries
  (``XREADGROUP ... 0``), then new ones (``>``), never asking for more than the
  free capacity ``buffer_size + concurrency - held``;
* ``concurrency`` **workers** take messages from an ``asyncio.Queue`` and run the
  handler under ``handler_timeout``: each worker holds an ``asyncio.timeout``
  scope that a lazily armed timer reschedules only when a handler is overdue
  (see ``_Deadline``);
* the **acker** coalesces acknowledgements (``_acker.py``);
* the **retrier** holds failed messages until their backoff ends, without a
  worker, then re-claims them to itself with ``XCLAIM`` so Redis counts the
  delivery, and puts them back in the queue;
* the **renewer** resets the idle time of every entry this consumer holds, so
  that no other consumer claims what is merely waiting in the buffer or for a retry;
* the **claimer** takes over entries that idled past ``pending_timeout`` (their
  consumer died) every ``claim_interval``.

"Held" means read from Redis and not yet acked or abandoned: queued, running or
waiting for a retry. Every held message is in the group's pending list under this
consumer's name, which is what makes a crash at any point safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import heapq
import inspect
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

from ._acker import Acker
from ._capabilities import CONSUMER_COMMANDS
from ._errors import (
    ClosedError,
    DeadLetteredError,
    GroupRecreatedError,
    HandlerError,
    HandlerPanic,
    MalformedMessageError,
    MessageLostError,
    StreamqError,
    convert,
    is_nogroup,
)
from ._errorstream import ErrorStream
from ._leases import Leases
from ._message import FieldValue, Message, validate_stream_name
from ._middleware import CallNext
from ._options import ConsumerOptions
from ._ordering import KeyLanes
from ._partition import KEY_FIELD, PartitionedStream
from ._result import Result, success
from ._retry import NetworkRetry
from ._transport import Transport, open_transport

__all__ = ["AsyncConsumer", "ConsumerState", "ConsumerStats", "Handler", "HandlerFunc"]

logger = logging.getLogger("streamq")

HandlerFunc: TypeAlias = Callable[[Message], Awaitable[Result | None]]
"""``async def handler(msg: Message) -> Result | None`` (``None`` means success)."""


@runtime_checkable
class Handler(Protocol):
    """An object whose ``handle_event`` coroutine method handles messages."""

    async def handle_event(self, msg: Message) -> Result | None:
        """Handle one message; return a :class:`~streamq.Result` or ``None`` for success."""


# Metadata fields added to dead-lettered entries. The prefix keeps them apart from
# the application's own fields; `streamq replay` strips them.
DEAD_FIELDS = (
    "streamq-original-id",
    "streamq-original-stream",
    "streamq-group",
    "streamq-consumer",
    "streamq-deliveries",
    "streamq-error",
    "streamq-dead-at",
)

_CLAIM_BATCH = 100
# Seconds a due retry may wait for others to share its XCLAIM.
_RETRY_WINDOW = 0.002
# What a reader's streams gave last time (see AsyncConsumer._read_group).
_IDLE, _ACTIVE, _DRAIN = "idle", "active", "drain"
_RENEW_CHUNK = 500
_SUCCESS = success()


# The consumer whose worker runs the current task (see aclose()).
_handling: contextvars.ContextVar[AsyncConsumer | None] = contextvars.ContextVar(
    "streamq_handling", default=None
)


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
    acked: int
    in_flight: int
    buffered: int
    waiting_retry: int
    pending_acks: int
    errors_reported: int
    errors_dropped: int


@dataclass(slots=True)
class _Subscription:
    stream: str
    # The handler itself, or the middleware chain ending in it; may return None.
    call: HandlerFunc
    dead_letter: HandlerFunc | None
    # Highest ID read from this stream, where a vanished group is recreated.
    last_id: str | None = None


def _adapt(handler: HandlerFunc | Handler, what: str) -> HandlerFunc:
    fn: Any = handler
    if not inspect.iscoroutinefunction(fn):
        method = getattr(handler, "handle_event", None)
        if method is not None and inspect.iscoroutinefunction(method):
            fn = method
        elif callable(handler) and inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - async __call__ objects
        ):
            fn = handler
        else:
            raise TypeError(
                f"{what}: expected an async function (async def f(msg)) or an object with "
                f"an async handle_event(msg) method, got {handler!r}"
            )
    try:
        inspect.signature(fn).bind(object())
    except TypeError:
        raise TypeError(
            f"{what}: {handler!r} must accept exactly one argument (the message)"
        ) from None
    except ValueError:  # no signature available (some builtins): let calls tell
        pass
    return fn  # type: ignore[no-any-return]


def _as_result(fn: HandlerFunc) -> CallNext:
    async def call(msg: Message) -> Result:
        result = await fn(msg)
        if result is None:
            return _SUCCESS
        if not isinstance(result, Result):
            raise TypeError(
                f"handler returned {type(result).__name__}; expected a streamq.Result or None"
            )
        return result

    return call


def _chain(call: CallNext, middleware: Iterable[Any]) -> CallNext:
    for mw in reversed(tuple(middleware)):

        def wrap(m: Any = mw, inner: CallNext = call) -> CallNext:
            async def wrapped(msg: Message) -> Result:
                return await m(msg, inner)  # type: ignore[no-any-return]

            return wrapped

        call = wrap()
    return call


def _next_id(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


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
        self._subs: dict[str, _Subscription] = {}
        self._state = ConsumerState.NEW
        self._errors = ErrorStream(options.error_buffer)
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._fatal: BaseException | None = None
        self._background: asyncio.Task[None] | None = None
        self._transport: Transport | None = None
        self._retry = NetworkRetry(options.backoff, options.network_retry, self._report)
        self._concurrency = options.effective_concurrency
        self._capacity = options.buffer_size + self._concurrency
        # Unbounded on purpose: the reader and the claimer each size their request
        # to the free capacity before awaiting Redis, so together they may overshoot
        # it by one batch. `_held` bounds memory; a bounded queue would raise
        # QueueFull in put_nowait and kill the consumer.
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._space = asyncio.Event()
        # Capacity promised to reads (and claims) in flight: their entries are not
        # held yet, but will be. Readers and the claimer size requests to what is
        # neither held nor reserved, so together they never exceed the capacity.
        self._reserved = 0
        self._lanes = KeyLanes()
        # Ordered streams are read under leases: one consumer of the group each.
        self._leases = Leases(options.group, options.consumer, options.pending_timeout or 60.0)
        # Leased streams that a reader is reading right now (see _lease_busy).
        self._reading: set[str] = set()
        # (stream, id) of every held message: what the renewer renews and the
        # claimer must not take.
        self._held: dict[tuple[str, str], Message] = {}
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._draining = asyncio.Event()
        self._retry_heap: list[tuple[float, int, Message]] = []
        self._retry_seq = itertools.count()
        self._retry_wake = asyncio.Event()
        self._acker: Acker | None = None
        self._started = asyncio.Event()
        self._busy: list[bool] = []
        # Raw fields of malformed entries, dead-lettered as they are.
        self._raw_dead: dict[tuple[str, str], list[Any]] = {}
        # Recovered or claimed messages whose handler has not started here yet. For
        # these, Redis' delivery counter is kept at the number of handler starts
        # (see _start_suspect), so that a crash counts against the message that was
        # running, not against every message that merely sat in the buffer.
        self._suspects: set[tuple[str, str]] = set()
        self._suspect_lock = asyncio.Lock()
        self._counts = dict.fromkeys(
            (
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
            ),
            0,
        )

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
                    self._lanes.fields[key] = stream.key_field
            if ordered_by_key:
                self._leases.add(stream.name, list(stream.keys))
            return
        if self._state is not ConsumerState.NEW:
            raise ClosedError(f"subscribe({stream!r}): the consumer is already {self._state.value}")
        validate_stream_name(stream, "stream")
        if stream in self._subs:
            raise ValueError(
                f"stream: {stream!r} is already subscribed (one handler per stream; "
                "one dead-letter handler at most)"
            )
        mw = self.options.middleware
        # Without middleware the handler is called directly (one coroutine frame
        # less per message); _call maps its None to success either way.
        fn = _adapt(handler, "handler")
        call = _chain(_as_result(fn), mw) if mw else fn
        dead = None
        if dead_letter is not None:
            dead_fn = _adapt(dead_letter, "dead_letter")
            dead = _chain(_as_result(dead_fn), mw) if mw else dead_fn
        self._subs[stream] = _Subscription(stream=stream, call=call, dead_letter=dead)
        if ordered_by_key:
            self._lanes.fields[stream] = KEY_FIELD
            self._leases.add(stream, [stream])

    def errors(self) -> ErrorStream:
        """The non-fatal errors, as an async iterator that ends when the consumer closes.

        Nobody has to read it: it keeps the newest ``error_buffer`` errors, counts
        the rest as dropped, and every error is also logged to ``streamq``.
        """
        return self._errors

    def stats(self) -> ConsumerStats:
        """A snapshot of counters (read, handled, retried, ...) and gauges (in flight, ...)."""
        c = self._counts
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
            acked=self._acker.acked if self._acker else 0,
            in_flight=self._in_flight,
            buffered=self._queue.qsize(),
            waiting_retry=len(self._retry_heap),
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
        if _handling.get() is self:
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
        self._transport = transport = open_transport(opts.redis, opts.command_timeout)
        self._acker = acker = Acker(transport, opts.group, self._retry, self._report)
        self._busy = [False] * self._concurrency
        try:
            async with asyncio.TaskGroup() as tg:
                background = [
                    tg.create_task(self._guard(self._read_loop()), name="streamq-reader"),
                    tg.create_task(self._guard(self._retry_loop()), name="streamq-retrier"),
                ]
                if opts.pending_timeout > 0:
                    background.append(
                        tg.create_task(self._guard(self._renew_loop()), name="streamq-renewer")
                    )
                if opts.claim_interval > 0:
                    background.append(
                        tg.create_task(self._guard(self._claim_loop()), name="streamq-claimer")
                    )
                if self._leases:
                    background.append(
                        tg.create_task(self._guard(self._lease_loop()), name="streamq-leases")
                    )
                ack_task = tg.create_task(self._guard(acker.run()), name="streamq-acker")
                workers = [
                    tg.create_task(self._worker(i), name=f"streamq-worker-{i}")
                    for i in range(self._concurrency)
                ]
                graceful = False
                try:
                    await self._stop.wait()
                    graceful = True
                finally:
                    await self._shutdown(background, workers, ack_task, graceful=graceful)
        finally:
            self._state = ConsumerState.CLOSING
            await self._release_leases()
            await transport.aclose()

    async def _shutdown(
        self,
        background: list[asyncio.Task[None]],
        workers: list[asyncio.Task[None]],
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
        self._draining.set()
        if self._in_flight == 0:
            self._drained.set()
        for busy, task in zip(self._busy, workers, strict=True):
            if not busy:
                task.cancel()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                await self._drained.wait()
        for task in workers:
            task.cancel()
        # A handler that ignores cancellation must not hold shutdown hostage: wait a
        # moment for workers, then flush the acks of whatever finished regardless.
        remaining = [t for t in (*workers, *background) if not t.done()]
        if remaining:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait(remaining, timeout=max(deadline - time.monotonic(), 0.1))
        if self._acker is not None and self._acker.pending and not ack_task.done():
            # Let a batch already on the wire land: cancelled mid-flight it would be
            # sent again by the final flush, and Redis would count it as a no-op.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(self.options.command_timeout):
                    await self._acker.wait_idle()
        ack_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([ack_task], timeout=self.options.command_timeout)
        acker = self._acker
        if acker is not None and acker.pending:
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
        stuck = [t for t in workers if not t.done()]
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

    async def _create_groups(
        self, start_id: str, *, recreate: bool, streams: Iterable[str] | None = None
    ) -> None:
        transport = self._transport
        assert transport is not None  # set by _run before any task starts
        group = self.options.group
        subs = self._subs.values() if streams is None else [self._subs[s] for s in streams]
        for sub in subs:
            position = start_id
            if recreate:
                # Resume after the last entry this consumer saw; on a stream that was
                # deleted (now empty) take everything that arrives from now on.
                length = await self._retry.call(
                    f"XLEN {sub.stream}",
                    transport.execute,
                    "XLEN",
                    sub.stream,
                )
                position = "0" if int(length) == 0 or sub.last_id is None else sub.last_id
            try:
                await self._retry.call(
                    f"XGROUP CREATE {sub.stream}",
                    transport.execute,
                    *("XGROUP", "CREATE", sub.stream, group, position, "MKSTREAM"),
                )
            except StreamqError as exc:
                if "BUSYGROUP" in str(exc.error):
                    continue
                raise
            if recreate:
                self._report(
                    GroupRecreatedError(
                        f"consumer group {group!r} of stream {sub.stream!r} was missing "
                        f"(deleted group or stream); recreated at {position}"
                    )
                )

    # -- reading -------------------------------------------------------------

    def _free(self) -> int:
        return self._capacity - len(self._held) - self._reserved

    async def _wait_for_space(self, minimum: int = 1) -> int:
        while True:
            free = self._free()
            if free >= minimum:
                return free
            self._space.clear()
            await self._space.wait()

    def _release(self, msg: Message) -> None:
        """Forget a message this consumer held (acked, dead-lettered or abandoned)."""
        self._suspects.discard((msg.stream, msg.id))
        if self._held.pop((msg.stream, msg.id), None) is not None:
            self._space.set()
            if self._lanes.fields:
                after = self._lanes.done(msg)
                if after is not None:
                    self._queue.put_nowait(after)

    def _admit(self, msg: Message) -> None:
        key = (msg.stream, msg.id)
        if key in self._held:
            return
        self._held[key] = msg
        if self._lanes.fields and not self._lanes.admit(msg):
            return  # parked behind an earlier message of its key
        self._queue.put_nowait(msg)

    def _admit_entries(self, stream: str, entries: list[Any]) -> None:
        """Admit the entries of one read (first deliveries): the read path's inner loop.

        Equivalent to :meth:`_make` then :meth:`_admit` for each entry, in one pass
        with the lookups hoisted and the field names decoded in C
        (``dict(zip(map(bytes.decode, it), it))``); about 0.5 us less per message.
        Anything unusual (malformed fields, ordering lanes) takes the general path.
        """
        self._counts["read"] += len(entries)
        if self._lanes.fields:
            for raw_id, fields in entries:
                msg = self._make(stream, raw_id, fields, 1)
                if msg is not None:
                    self._admit(msg)
            return
        held = self._held
        put = self._queue.put_nowait
        received = Message._received
        decode = bytes.decode
        for raw_id, fields in entries:
            try:
                entry_id = decode(raw_id)
                it = iter(fields)
                values: dict[str, FieldValue] = dict(zip(map(decode, it), it, strict=True))
            except (UnicodeDecodeError, ValueError, TypeError):
                msg = self._make(stream, raw_id, fields, 1)  # reports it
                if msg is not None:
                    self._admit(msg)
                continue
            key = (stream, entry_id)
            if key in held:
                continue
            msg = received(stream, entry_id, values, 1)
            held[key] = msg
            put(msg)

    def _make(self, stream: str, raw_id: Any, fields: Any, deliveries: int) -> Message | None:
        """Turn one raw entry into a Message; report and dead-letter what cannot be."""
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
            self._held[(stream, entry_id)] = raw
            self._raw_dead[(stream, entry_id)] = list(fields or ())
            self._queue.put_nowait(raw)
            return None
        return Message._received(stream, entry_id, values, deliveries)

    async def _read_loop(self) -> None:
        transport = self._transport
        assert transport is not None
        opts = self.options
        await self._retry.call("INFO", transport.server_info, CONSUMER_COMMANDS)
        await self._create_groups(opts.start_id, recreate=False)
        await self._recover_own_pending()
        # Claiming and renewing start only now, so that they never race the
        # recovery of this consumer's own pending entries.
        self._started.set()
        groups = self._read_groups()
        total = sum(map(len, groups))
        if len(groups) == 1:
            await self._read_any(groups[0], 1, total)
            return
        try:
            async with asyncio.TaskGroup() as tg:
                for i, streams in enumerate(groups):
                    tg.create_task(
                        self._read_any(streams, len(groups), total), name=f"streamq-reader-{i}"
                    )
        except ExceptionGroup as group:
            raise group.exceptions[0] from None

    def _read_groups(self) -> list[list[str]]:
        """The streams of each reader: one slot's worth (all, on a single server).

        At most ``capacity`` streams per reader, so that one entry of each fits.
        """
        assert self._transport is not None
        size = self._capacity
        return [
            streams[i : i + size]
            for streams in self._transport.slot_groups(self._subs)
            for i in range(0, len(streams), size)
        ]

    async def _read_any(self, streams: list[str], readers: int, total: int) -> None:
        if any(stream in self._leases.exclusive for stream in streams):
            await self._read_leased(streams, readers, total)
        else:
            await self._read_group(streams, readers, total)

    async def _read_leased(self, streams: list[str], readers: int, total: int) -> None:
        """Read those of ``streams`` this consumer may read, restarting when that changes.

        A leased stream is read only while this consumer holds its lease. When
        ownership changes (rare: a consumer joined or left) the reader finishes its
        current read and starts over with the new set: a read cancelled in flight
        could leave entries delivered to nobody, which would come back out of order.
        """
        leases = self._leases
        while True:
            changed = leases.changed
            active = [stream for stream in streams if leases.readable(stream)]
            if not active:
                await changed.wait()
                continue
            self._reading.update(active)
            try:
                await self._read_group(active, readers, total, until=changed)
            finally:
                self._reading.difference_update(active)

    async def _read_group(
        self, streams: list[str], readers: int, total: int, until: asyncio.Event | None = None
    ) -> None:
        """Read new entries of ``streams`` into the buffer until cancelled (or ``until``).

        Each read reserves the capacity it asks for (``COUNT`` applies per stream:
        ``m`` streams reserve ``m * count``), and a blocking read keeps it while it
        waits, so the size of a read follows what the streams had last time:

        * idle (the last blocking read timed out): block asking one entry per
          stream, so that idle streams tie up almost nothing;
        * active (entries came, fewer than asked): block asking a share of the
          capacity that leaves room for the other readers and the claimer;
        * draining (a stream gave all that was asked): ask for more without
          blocking, since entries are waiting.

        With more streams than half the capacity, reads block at most 0.1 s, so
        that quiet streams cannot hold the capacity that busy ones need for long.
        """
        transport = self._transport
        assert transport is not None
        opts = self.options
        m = len(streams)
        active_share = max(m, -(-self._capacity // (readers + 1)))
        drain_share = max(m, -(-self._capacity // readers))
        block_ms = round(opts.read_timeout * 1000)
        idle_ms = block_ms
        if total > self._capacity // 2 and not 0 < block_ms <= 100:
            idle_ms = block_ms = 100
        prefix = ["XREADGROUP", "GROUP", opts.group, opts.consumer, "COUNT"]
        keys = ["STREAMS", *streams, *([">"] * m)]
        subs = self._subs
        nogroup_streak = 0
        mode = _IDLE
        while True:
            if until is not None and until.is_set():
                return
            if mode is _DRAIN:
                # Let the workers take (and fast handlers finish) what the last read
                # queued before this one is sized: with a backlog, reads then ask for
                # the whole free capacity rather than what was free mid-batch.
                await asyncio.sleep(0)
            free = await self._wait_for_space(m)
            share = m if mode is _IDLE else active_share if mode is _ACTIVE else drain_share
            count = max(1, min(free, share) // m)
            reserved = count * m
            self._reserved += reserved
            try:
                if mode is _DRAIN:
                    reply = await self._retry.call(
                        "XREADGROUP", transport.execute, *prefix, count, *keys
                    )
                else:
                    ms = idle_ms if mode is _IDLE else block_ms
                    args = [*prefix, count, "BLOCK", ms, *keys]
                    reply = await self._retry.call(
                        "XREADGROUP", transport.blocking, args, ms / 1000
                    )
            except StreamqError as exc:
                self._reserved -= reserved
                self._space.set()
                if exc.error is not None and is_nogroup(exc.error):
                    await asyncio.sleep(opts.backoff.for_attempt(nogroup_streak))
                    nogroup_streak += 1
                    await self._create_groups(opts.start_id, recreate=True, streams=streams)
                    mode = _IDLE
                    continue
                raise
            except BaseException:
                self._reserved -= reserved
                raise
            # No await from here to the end of the admissions: the reservation turns
            # into held entries without anyone else seeing the capacity in between.
            self._reserved -= reserved
            nogroup_streak = 0
            if not reply:
                mode = _ACTIVE if mode is _DRAIN else _IDLE
                self._space.set()
                # Let readers waiting for space reserve before this one blocks again.
                await asyncio.sleep(0)
                continue
            mode = _ACTIVE
            got = 0
            for raw_stream, entries in reply:
                stream = raw_stream.decode()
                sub = subs[stream]
                self._admit_entries(stream, entries)
                if entries:
                    last = entries[-1][0]
                    sub.last_id = last.decode() if isinstance(last, bytes) else str(last)
                    got += len(entries)
                    if len(entries) >= count:
                        mode = _DRAIN
            if got < reserved:
                self._space.set()

    async def _recover_own_pending(self) -> None:
        """Re-deliver what this consumer read but never acked (e.g. before a crash)."""
        for streams in self._read_groups():
            await self._recover_group(streams)

    async def _recover_group(self, group: list[str]) -> None:
        transport = self._transport
        assert transport is not None
        opts = self.options
        cursors = dict.fromkeys(group, "0")
        while cursors:
            # COUNT applies per stream. Nothing else reads or claims yet.
            free = await self._wait_for_space(len(cursors)) // len(cursors)
            streams = list(cursors)
            args = [
                "XREADGROUP", "GROUP", opts.group, opts.consumer, "COUNT", free,
                "STREAMS", *streams, *(cursors[s] for s in streams),
            ]  # fmt: skip
            reply = await self._retry.call("XREADGROUP 0", transport.execute, *args)
            got = {raw_stream.decode(): entries for raw_stream, entries in reply or ()}
            for stream in streams:
                entries = got.get(stream)
                if not entries:
                    del cursors[stream]
                    continue
                ids = [e[0].decode() for e in entries]
                cursors[stream] = ids[-1]
                deliveries = await self._deliveries(stream, ids[0], ids[-1], len(ids))
                # Re-reading counted a delivery, but no handler started: undo it.
                started = {i: max(n - 1, 1) for i, n in deliveries.items()}
                await self._set_deliveries(stream, started)
                for (_, fields), entry_id in zip(entries, ids, strict=True):
                    if fields is None:
                        self._lost(stream, entry_id)
                        continue
                    msg = self._make(stream, entry_id.encode(), fields, started.get(entry_id, 1))
                    self._counts["recovered"] += 1
                    if msg is not None:
                        self._admit(msg)
                        self._suspects.add((stream, entry_id))

    async def _claim_ids(
        self, stream: str, idle_ms: int, wanted: list[str], counts: dict[str, int]
    ) -> list[Any]:
        """XCLAIM ``wanted`` to this consumer, keeping each one's delivery counter.

        Claiming is not a handler start (see :meth:`_start_suspect`), so the counter
        is set back to what it was (``RETRYCOUNT``): one XCLAIM per distinct count,
        usually a single one.
        """
        transport = self._transport
        assert transport is not None
        opts = self.options
        by_value: dict[int, list[str]] = {}
        for entry_id in wanted:
            by_value.setdefault(counts[entry_id], []).append(entry_id)
        reply: list[Any] = []
        for n, ids in by_value.items():
            part = await self._retry.call(
                f"XCLAIM {stream}",
                transport.execute,
                *("XCLAIM", stream, opts.group, opts.consumer, idle_ms, *ids, "RETRYCOUNT", n),
            )
            reply.extend(part or ())
        return reply

    async def _start_suspect(self, msg: Message) -> None:
        """Count, in Redis, a handler start on a recovered or claimed message.

        Reading such a message back or claiming it does not count (see
        :meth:`_set_deliveries`); this does, before the handler runs. Redis' counter
        then tells how often a handler started on it without an ack: a message that
        kills its process is dead-lettered after max_retry + 1 starts, while the
        messages buffered beside it when it struck are not charged for the crashes.
        """
        self._suspects.discard((msg.stream, msg.id))
        msg._deliveries += 1
        await self._set_deliveries(msg.stream, {msg.id: msg._deliveries})

    async def _set_deliveries(self, stream: str, counts: dict[str, int]) -> None:
        """Set Redis' delivery counter of this consumer's pending entries.

        ``XCLAIM ... RETRYCOUNT n JUSTID`` to itself: the entry stays where it is.
        An entry gone from the group (acked, or the group vanished) is skipped.
        """
        transport = self._transport
        assert transport is not None
        opts = self.options
        by_value: dict[int, list[str]] = {}
        for entry_id, n in counts.items():
            by_value.setdefault(n, []).append(entry_id)
        commands = [
            ("XCLAIM", stream, opts.group, opts.consumer, 0, *ids, "RETRYCOUNT", n, "JUSTID")
            for n, ids in by_value.items()
        ]
        if commands:
            await transport.pipeline_retrying(f"XCLAIM {stream}", commands, self._retry)

    async def _deliveries(self, stream: str, first: str, last: str, count: int) -> dict[str, int]:
        """Delivery counts of this consumer's pending entries between two IDs."""
        transport = self._transport
        assert transport is not None
        opts = self.options
        reply = await self._retry.call(
            f"XPENDING {stream}",
            transport.execute,
            *("XPENDING", stream, opts.group, first, last, count, opts.consumer),
        )
        return {row[0].decode(): int(row[3]) for row in reply or ()}

    def _lost(self, stream: str, entry_id: str) -> None:
        self._counts["lost"] += 1
        self._report(
            MessageLostError(
                f"entry {entry_id} of {stream!r} was deleted from the stream (trimmed?) "
                "before it was processed; removing it from the pending list",
                stream=stream,
                entry_id=entry_id,
            )
        )
        assert self._acker is not None
        self._acker.add(stream, entry_id)

    # -- handling ------------------------------------------------------------

    async def _worker(self, index: int) -> None:
        queue = self._queue
        busy = self._busy
        deadline = _Deadline()
        _handling.set(self)  # this task's own context: seen by aclose() from handlers
        await deadline.open()
        try:
            # Checked before each get too: a handler that swallowed its cancellation
            # at shutdown must not go on to wait for (and block listen() on) more.
            while not self._draining.is_set():
                msg = await queue.get()
                if self._draining.is_set():
                    return
                self._in_flight += 1
                busy[index] = True
                try:
                    if self._suspects:
                        await self._process(msg, deadline)
                    else:
                        # The usual case, one coroutine frame shorter.
                        await self._handle(msg, deadline)
                except Exception as exc:
                    # Handler errors never get here (_call maps them to results):
                    # this is Redis refusing a dead-letter append or a counter
                    # update for good. Stop with that fatal error (the message stays
                    # pending) instead of an ExceptionGroup from the task group.
                    self._fail(convert(exc, "consumer"))
                    return
                finally:
                    busy[index] = False
                    self._in_flight -= 1
                    if self._in_flight == 0 and self._draining.is_set():
                        self._drained.set()
        finally:
            await deadline.close()

    async def _process(self, msg: Message, deadline: _Deadline) -> None:
        if self._suspects and (msg.stream, msg.id) in self._suspects:
            if msg._deliveries < 2:
                # Back once: most likely it sat in a buffer at a restart, or one
                # crash caught it. Run it as usual, counting the start.
                await self._start_suspect(msg)
                await self._handle(msg, deadline)
                return
            # Back again after starting here: a crash loop. One such suspect at a
            # time, each acked before the next starts: a message that kills the
            # process then takes down no other, so crashes charge it alone.
            async with self._suspect_lock:
                await self._start_suspect(msg)
                await self._handle(msg, deadline)
                if self._acker is not None and self._acker.pending:
                    await self._acker.wait_idle()
            return
        await self._handle(msg, deadline)

    async def _handle(self, msg: Message, deadline: _Deadline) -> None:
        sub = self._subs[msg.stream]
        max_retry = self.options.max_retry
        raw = self._raw_dead.pop((msg.stream, msg.id), None) if self._raw_dead else None
        if raw is not None:
            # The reason goes into the dead-letter entry's streamq-error field.
            malformed = ValueError("field names are not valid UTF-8")
            await self._dead_letter(msg, sub, malformed, deadline, raw_fields=raw)
            return
        if max_retry >= 0 and msg._deliveries > max_retry + 1:
            err = HandlerError(
                f"message {msg.id} of {msg.stream!r} was delivered {msg._deliveries} times "
                "without being acknowledged (its consumer crashed or was killed?)",
                message=msg,
            )
            await self._dead_letter(msg, sub, err, deadline)
            return
        result = await self._call(sub.call, msg, deadline)
        counts = self._counts
        counts["handled"] += 1
        if result.error is None:
            # The common case, without the detour through _settle.
            counts["succeeded"] += 1
            self._ack(msg)
            return
        self._settle(msg, sub, result)
        if result.retry and max_retry >= 0 and msg.retry_count >= max_retry:
            await self._dead_letter(msg, sub, result.error, deadline)

    async def _call(self, call: HandlerFunc, msg: Message, deadline: _Deadline) -> Result:
        """Run a handler under ``handler_timeout`` and map its outcome to a Result.

        The worker's :class:`_Deadline` holds an ``asyncio.timeout`` scope that is
        rescheduled only when the running handler is overdue: ``asyncio.timeout``
        then cancels the handler and, when the scope is left here, turns the
        cancellation into ``TimeoutError``, or lets it through when the consumer
        itself is being cancelled too.
        """
        timeout = self.options.handler_timeout
        if timeout:
            deadline.start(timeout)
        result: Any  # checked below: a handler may return anything
        try:
            result = await call(msg)
        except BaseException as exc:
            deadline.due = 0.0
            if deadline.fired and await deadline.renew(exc):
                error = TimeoutError(f"handler took longer than handler_timeout={timeout} s")
                error.__cause__ = exc
                return Result(retry=True, error=_Timeout(error))
            if isinstance(exc, asyncio.CancelledError):
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
                # Nobody cancelled this worker: the handler raised CancelledError
                # itself (e.g. it awaited a future someone else cancelled). Letting
                # it escape would end the worker silently and strand its message.
                return Result(retry=True, error=_Panic(exc))
            if not isinstance(exc, Exception):
                raise
            # Includes a TimeoutError of the handler's own: not handler_timeout firing.
            return Result(retry=True, error=_Panic(exc))
        deadline.due = 0.0
        if deadline.fired:
            # The handler finished although its deadline fired (it swallowed the
            # cancellation, or finished first): its outcome stands.
            await deadline.renew(None)
        if result is None:
            return _SUCCESS
        if isinstance(result, Result):
            return result
        wrong = TypeError(
            f"handler returned {type(result).__name__}; expected a streamq.Result or None"
        )
        return Result(retry=True, error=_Panic(wrong))

    def _settle(self, msg: Message, sub: _Subscription, result: Result) -> None:
        """Ack, schedule a retry, or leave for dead-lettering, and report."""
        error = result.error
        if error is None:
            self._counts["succeeded"] += 1
            self._ack(msg)
            return
        exhausted = self.options.max_retry >= 0 and msg.retry_count >= self.options.max_retry
        retrying = result.retry and not exhausted
        if isinstance(error, _Panic):
            cause = error.error
            self._report(
                HandlerPanic(
                    f"handler for {msg.stream!r} raised {type(cause).__name__}: {cause} "
                    f"(message {msg.id}, delivery {msg.deliveries})",
                    message=msg,
                    error=cause,
                    retrying=retrying,
                )
            )
        else:
            cause = error.error if isinstance(error, _Timeout) else error
            self._report(
                HandlerError(
                    f"handler for {msg.stream!r} failed: {cause} "
                    f"(message {msg.id}, delivery {msg.deliveries})",
                    message=msg,
                    error=cause,
                    retrying=retrying,
                )
            )
        if not result.retry:
            self._counts["discarded"] += 1
            self._ack(msg)
            return
        self._counts["failed"] += 1
        if retrying:
            delay = result.backoff
            if delay is None:
                delay = self.options.backoff.for_attempt(msg.retry_count)
            self._schedule_retry(msg, delay)

    def _ack(self, msg: Message) -> None:
        assert self._acker is not None
        self._acker.add(msg.stream, msg.id)
        self._release(msg)

    async def _dead_letter(
        self,
        msg: Message,
        sub: _Subscription,
        error: BaseException | None,
        deadline: _Deadline,
        *,
        raw_fields: list[Any] | None = None,
    ) -> None:
        """Give an exhausted message to the dead-letter handler, or the dead-letter stream."""
        if isinstance(error, _Panic | _Timeout):
            error = error.error
        if sub.dead_letter is not None and raw_fields is None:
            self._report(
                DeadLetteredError(
                    f"message {msg.id} of {msg.stream!r} exhausted max_retry="
                    f"{self.options.max_retry}; passing it to the dead-letter handler",
                    message=msg,
                    error=error,
                )
            )
            result = await self._call(sub.dead_letter, msg, deadline)
            if result.ok:
                self._counts["dead_lettered"] += 1
                self._ack(msg)
            elif not result.retry:
                self._settle(msg, sub, result)
            else:
                # Keep it: it comes back to the dead-letter handler after a backoff.
                self._settle_dead_retry(msg, sub, result)
            return
        target = self.options.dead_letter_stream_for(msg.stream)
        if target is not None:
            await self._append_dead(msg, target, error, raw_fields)
        self._counts["dead_lettered"] += 1
        why = (
            "is malformed"
            if raw_fields is not None
            else f"exhausted max_retry={self.options.max_retry}"
        )
        self._report(
            DeadLetteredError(
                f"message {msg.id} of {msg.stream!r} {why}"
                + (
                    f"; appended to {target!r}" if target else "; dropped (dead_letter_stream=None)"
                ),
                message=msg,
                error=error,
                dead_letter_stream=target,
            )
        )
        # Acked only after the dead-letter entry is stored: a crash in between
        # duplicates the dead letter at worst, never loses the message.
        self._ack(msg)

    def _settle_dead_retry(self, msg: Message, sub: _Subscription, result: Result) -> None:
        self._counts["failed"] += 1
        error = result.error
        cause = error.error if isinstance(error, _Panic | _Timeout) else error
        self._report(
            HandlerError(
                f"dead-letter handler for {msg.stream!r} failed: {cause} (message {msg.id})",
                message=msg,
                error=cause,
                retrying=True,
            )
        )
        delay = result.backoff
        if delay is None:
            delay = self.options.backoff.for_attempt(msg.retry_count)
        self._schedule_retry(msg, delay)

    async def _append_dead(
        self,
        msg: Message,
        target: str,
        error: BaseException | None,
        raw_fields: list[Any] | None,
    ) -> None:
        transport = self._transport
        assert transport is not None
        opts = self.options
        fields: list[Any] = []
        if raw_fields is not None:
            fields.extend(raw_fields)
        else:
            for k, v in msg.values.items():
                fields.extend((k, v))
        error_text = "" if error is None else f"{type(error).__name__}: {error}"
        meta = (
            msg.id,
            msg.stream,
            opts.group,
            opts.consumer,
            msg.deliveries,
            error_text,
            f"{time.time():.3f}",
        )
        for name, value in zip(DEAD_FIELDS, meta, strict=True):
            fields.extend((name, value))
        await self._retry.call(
            f"XADD {target}", transport.execute, "XADD", target, "*", *fields, message=msg
        )

    # -- retries, renewal, claiming -----------------------------------------

    def _schedule_retry(self, msg: Message, delay: float) -> None:
        heap = self._retry_heap
        entry = (time.monotonic() + delay, next(self._retry_seq), msg)
        heapq.heappush(heap, entry)
        # The retrier sleeps until the earliest entry is due: only a new earliest
        # entry changes that. Waking it for every failure cost more than the retry.
        if heap[0] is entry:
            self._retry_wake.set()

    async def _retry_loop(self) -> None:
        heap = self._retry_heap
        while True:
            now = time.monotonic()
            if not heap:
                self._retry_wake.clear()
                await self._retry_wake.wait()
                continue
            if heap[0][0] > now:
                self._retry_wake.clear()
                with contextlib.suppress(TimeoutError):
                    # Up to _RETRY_WINDOW late, so that retries falling due close
                    # together share one XCLAIM instead of one round trip each.
                    async with asyncio.timeout(heap[0][0] - now + _RETRY_WINDOW):
                        await self._retry_wake.wait()
                continue
            due: dict[str, list[Message]] = {}
            while heap and heap[0][0] <= now:
                msg = heapq.heappop(heap)[2]
                due.setdefault(msg.stream, []).append(msg)
            for stream, msgs in due.items():
                await self._reclaim(stream, msgs)

    async def _reclaim(self, stream: str, msgs: list[Message]) -> None:
        """Claim due retries back to this consumer (Redis counts the delivery) and queue them."""
        transport = self._transport
        assert transport is not None
        opts = self.options
        by_id = {m.id: m for m in msgs}
        try:
            reply = await self._retry.call(
                f"XCLAIM {stream}",
                transport.execute,
                "XCLAIM",
                stream,
                opts.group,
                opts.consumer,
                0,
                *by_id,
            )
        except StreamqError as exc:
            if exc.error is None or not is_nogroup(exc.error):
                raise
            # The group vanished with these entries in it: handle them again from
            # memory rather than lose them (their ack will be a no-op).
            for msg in msgs:
                msg._deliveries += 1
                self._queue.put_nowait(msg)
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
            self._counts["retried"] += 1
            # Still held (counted in capacity); the queue always has room for it.
            self._queue.put_nowait(old)
        for entry_id, msg in by_id.items():
            self._release(msg)
            await self._gone(stream, entry_id)

    async def _gone(self, stream: str, entry_id: str) -> None:
        """An entry could not be claimed: trimmed (report it) or taken by another consumer."""
        transport = self._transport
        assert transport is not None
        found = await self._retry.call(
            f"XRANGE {stream}", transport.execute, "XRANGE", stream, entry_id, entry_id
        )
        if not found:
            self._lost(stream, entry_id)

    async def _renew_loop(self) -> None:
        transport = self._transport
        assert transport is not None
        opts = self.options
        interval = opts.pending_timeout / 3
        await self._started.wait()
        while True:
            await asyncio.sleep(interval)
            by_stream: dict[str, list[str]] = {}
            for stream, entry_id in list(self._held):
                by_stream.setdefault(stream, []).append(entry_id)
            commands = [
                (
                    "XCLAIM",
                    stream,
                    opts.group,
                    opts.consumer,
                    0,
                    *ids[i : i + _RENEW_CHUNK],
                    "JUSTID",
                )
                for stream, ids in by_stream.items()
                for i in range(0, len(ids), _RENEW_CHUNK)
            ]
            if commands:
                await transport.pipeline_retrying("XCLAIM JUSTID", commands, self._retry)

    async def _claim_loop(self) -> None:
        opts = self.options
        await self._started.wait()
        while True:
            for stream in list(self._subs):
                if not self._leases.readable(stream):
                    continue  # its owner claims there
                try:
                    await self._claim(stream)
                    await self._claim(stream, orphans=True)
                except StreamqError as exc:
                    # The reader recreates a vanished group; claiming waits for it.
                    if exc.error is None or not is_nogroup(exc.error):
                        raise
            await asyncio.sleep(opts.claim_interval)

    # -- leases (ordered streams) -----------------------------------------------

    async def _lease_loop(self) -> None:
        await self._started.wait()
        assert self._transport is not None
        await self._leases.run(
            self._transport, self._retry, self._lease_busy, self._take_over, self._report
        )

    def _lease_busy(self, stream: str) -> bool:
        """Whether this consumer still reads, or holds messages of, ``stream``."""
        return stream in self._reading or any(key[0] == stream for key in self._held)

    async def _take_over(self, stream: str) -> None:
        """Claim every entry of a newly leased ``stream`` still pending for another consumer.

        They come before anything new in the stream (a crashed owner read them
        first), so the stream is read only after this.
        """
        transport = self._transport
        assert transport is not None
        opts = self.options
        start = "-"
        while True:
            rows = await self._retry.call(
                f"XPENDING {stream}",
                transport.execute,
                *("XPENDING", stream, opts.group, start, "+", _CLAIM_BATCH),
            )
            if not rows:
                return
            start = "(" + rows[-1][0].decode()
            counts = {
                row[0].decode(): int(row[3])
                for row in rows
                if row[1].decode() != opts.consumer and (stream, row[0].decode()) not in self._held
            }
            waiting = list(counts)
            while waiting:
                free = await self._wait_for_space()
                wanted, waiting = waiting[:free], waiting[free:]
                self._reserved += len(wanted)
                try:
                    reply = await self._claim_ids(stream, 0, wanted, counts)
                finally:
                    self._reserved -= len(wanted)
                claimed = set()
                for entry in reply:
                    if entry is None:
                        continue
                    raw_id, fields = entry
                    entry_id = raw_id.decode()
                    claimed.add(entry_id)
                    if fields is None:
                        self._lost(stream, entry_id)
                        continue
                    msg = self._make(stream, raw_id, fields, counts[entry_id])
                    self._counts["claimed"] += 1
                    if msg is not None:
                        self._admit(msg)
                        self._suspects.add((stream, entry_id))
                for entry_id in wanted:
                    if entry_id not in claimed:
                        await self._gone(stream, entry_id)
            if len(rows) < _CLAIM_BATCH:
                return

    async def _release_leases(self) -> None:
        """Hand the leases back at shutdown, so that others take over at once."""
        if not self._leases or self._transport is None:
            return
        try:
            async with asyncio.timeout(self.options.command_timeout):
                await self._leases.release_all(self._transport)
        except Exception as exc:
            # They expire after pending_timeout anyway.
            self._report(convert(exc, "lease release"))

    async def _claim(self, stream: str, *, orphans: bool = False) -> None:
        """Take over entries of ``stream`` idle longer than pending_timeout.

        With ``orphans``, take back this consumer's own pending entries that it does
        not hold: Redis delivered them, but the reply was lost with a broken or
        stalled connection, so nothing would handle them before pending_timeout.
        A delivered reply reaches us within command_timeout or its connection is
        dropped, so an unheld own entry idle longer than that is an orphan.
        """
        transport = self._transport
        assert transport is not None
        opts = self.options
        idle_ms = round(opts.pending_timeout * 1000)
        only: tuple[str, ...] = ()
        if orphans:
            if opts.command_timeout >= opts.pending_timeout:
                return  # the ordinary claim is as quick
            idle_ms, only = round(opts.command_timeout * 1000), (opts.consumer,)
        start = "-"
        while True:
            free = self._free()
            if free <= 0:
                return
            rows = await self._retry.call(
                f"XPENDING {stream}",
                transport.execute,
                *("XPENDING", stream, opts.group, "IDLE", idle_ms, start, "+", _CLAIM_BATCH, *only),
            )
            if not rows:
                return
            if only and self._acker is not None and self._acker.pending:
                # Finished messages are released before Redis confirms their ack:
                # while acks are unconfirmed, an unheld entry may be one of them.
                return
            counts: dict[str, int] = {}
            for row in rows:
                entry_id = row[0].decode()
                if (stream, entry_id) not in self._held:
                    counts[entry_id] = int(row[3])
            start = "(" + rows[-1][0].decode()
            wanted = list(counts)[:free]
            if wanted:
                # Reserved while the claim is in flight; turned into held entries
                # below without an await in between.
                self._reserved += len(wanted)
                try:
                    reply = await self._claim_ids(stream, idle_ms, wanted, counts)
                finally:
                    self._reserved -= len(wanted)
                claimed = set()
                for entry in reply or ():
                    if entry is None:
                        continue  # deleted (6.2 answers nil, 7.0+ omits it): _gone() below
                    raw_id, fields = entry
                    entry_id = raw_id.decode()
                    claimed.add(entry_id)
                    if fields is None:
                        self._lost(stream, entry_id)
                        continue
                    msg = self._make(stream, raw_id, fields, counts[entry_id])
                    self._counts["claimed"] += 1
                    if msg is not None:
                        self._admit(msg)
                        self._suspects.add((stream, entry_id))
                for entry_id in wanted:
                    if entry_id not in claimed:
                        await self._gone(stream, entry_id)
            if len(rows) < _CLAIM_BATCH:
                return


# A timer may run a little before its time: asyncio's by up to the clock's
# resolution, uvloop's (millisecond timers) by up to a millisecond.
_TIMER_SLACK = 0.001


class _Deadline:
    """The ``handler_timeout`` of one worker: an ``asyncio.timeout`` scope and a lazy timer.

    ``asyncio.timeout(handler_timeout)`` around each handler call costs about 4 us
    here (a Timeout object, its enter and exit coroutines, and a TimerHandle pushed
    onto and cancelled from the loop's heap); even ``asyncio.timeout(None)``, which
    schedules nothing, costs 1.8 us on Python 3.11: together, close to half the
    per-message budget. So a worker keeps one ``asyncio.timeout(None)`` scope open
    across its handler calls, records when the running handler is due (``due``,
    0 between handlers), and keeps at most one timer. When the timer fires it
    either re-arms itself for the handler running now (a busy worker arms about
    one timer per ``handler_timeout``, not per message), or finds that handler
    overdue and reschedules the scope to its due time: ``asyncio.timeout`` itself
    then cancels the handler. The worker leaves that scope as soon as the handler
    ends (:meth:`renew`), where ``asyncio.timeout`` turns the cancellation into
    ``TimeoutError`` (or not, when the consumer is being cancelled as well), and
    enters a fresh one. Outside handler calls the scope never fires.
    """

    __slots__ = ("_loop", "due", "fired", "scope", "timer")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.due = 0.0
        self.fired = False
        self.scope: asyncio.Timeout | None = None
        self.timer: asyncio.TimerHandle | None = None

    async def open(self) -> None:
        """Enter a fresh scope (the worker calls this before its first handler)."""
        scope = asyncio.timeout(None)
        await scope.__aenter__()
        self.scope = scope

    def start(self, timeout: float) -> None:
        """A handler starts now and must finish within ``timeout`` seconds."""
        self.due = due = self._loop.time() + timeout
        if self.timer is None:
            self.timer = self._loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self.timer = None
        due = self.due
        if not due:
            return  # idle: the next handler arms a new timer
        loop = self._loop
        if due - loop.time() > _TIMER_SLACK:
            self.timer = loop.call_at(due, self._fire)  # a later handler is running
            return
        scope = self.scope
        if scope is not None:
            self.due = 0.0
            self.fired = True
            # Now, or within the timer's slack: asyncio.timeout cancels the handler.
            scope.reschedule(due)

    async def renew(self, exc: BaseException | None) -> bool:
        """Settle the scope after the handler its deadline fired on ended (with ``exc``).

        Returns:
            Whether the handler timed out: ``asyncio.timeout`` cancelled it and
            turned that cancellation (``exc``) into ``TimeoutError``.
        """
        self.fired = False
        scope = self.scope
        assert scope is not None  # fired only while a scope is open
        if not scope.expired():
            # The handler ended before asyncio.timeout acted: call it off.
            scope.reschedule(None)
            return False
        self.scope = None
        try:
            if exc is None:
                # It swallowed the cancellation: leaving withdraws our request.
                await scope.__aexit__(None, None, None)
            else:
                await scope.__aexit__(type(exc), exc, exc.__traceback__)
        except TimeoutError:
            return True
        finally:
            await self.open()
        return False

    async def close(self) -> None:
        """Drop the timer and leave the scope (the worker is ending)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        scope, self.scope = self.scope, None
        if scope is not None:
            await scope.__aexit__(None, None, None)


class _Panic(Exception):
    """Internal marker: the handler raised ``error``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Timeout(Exception):
    """Internal marker: the handler hit handler_timeout (``error`` is a TimeoutError)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error
