"""The workers: run handlers under ``handler_timeout``, then ack, retry or dead-letter.

``concurrency`` worker tasks take messages from the holding's queue. A handler's
outcome (its :class:`~streamq.Result`, an exception, a timeout) never escapes a
worker: it becomes an ack, a retry through the retrier, or a dead letter, and is
reported. Only Redis refusing a dead-letter append or a counter update for good
stops the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from typing import Any

from ._dead_letter import dead_letter_fields
from ._deadline import Deadline
from ._deliveries import Deliveries
from ._errors import DeadLetteredError, HandlerError, HandlerPanic, convert
from ._message import Message
from ._result import Result, success
from ._retrier import Retrier
from ._shared import Shared
from ._subscription import HandlerFunc, Subscription

__all__ = ["Workers", "dead_letter_call", "handling"]

_SUCCESS = success()

# The consumer (its Shared) whose worker runs the current task: aclose() called
# from a handler must not wait for that very handler.
handling: contextvars.ContextVar[Shared | None] = contextvars.ContextVar(
    "streamq_handling", default=None
)

# True while a dead-letter handler runs: middleware wraps it like the handler, and
# tracing must not describe its outcome as the handler's (streamq.otel reads it).
dead_letter_call: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "streamq_dead_letter_call", default=False
)


class Workers:
    """What the worker tasks of one consumer share, and what each of them runs.

    Args:
        shared: The consumer's shared state (with its acker set).
        deliveries: Counts handler starts on recovered and claimed messages.
        retrier: Where failed messages wait for their retry.

    Attributes:
        busy: Per worker, whether it is running a message now.
        in_flight: Messages being handled.
        draining: Set at shutdown: workers take no new message.
        drained: Set once draining and no message is in flight.
    """

    def __init__(self, shared: Shared, deliveries: Deliveries, retrier: Retrier) -> None:
        self._shared = shared
        self._deliveries = deliveries
        self._retrier = retrier
        opts = shared.options
        self._opts = opts
        holding = shared.holding
        self._queue = holding.queue
        self._suspects = holding.suspects
        self._raw_dead = holding.raw_dead
        self._release = holding.release
        self._subs = shared.subs
        self._counts = shared.counts
        self._acker = shared.acker
        self._report = shared.report
        self._suspect_lock = asyncio.Lock()
        self.busy = [False] * opts.effective_concurrency
        self.in_flight = 0
        self.draining = asyncio.Event()
        self.drained = asyncio.Event()

    async def run(self, index: int) -> None:
        """Worker ``index``: handle queued messages until draining or cancelled."""
        queue = self._queue
        busy = self.busy
        draining = self.draining
        deadline = Deadline()
        handling.set(self._shared)  # this task's own context: seen by aclose() from handlers
        await deadline.open()
        try:
            # Checked before each get too: a handler that swallowed its cancellation
            # at shutdown must not go on to wait for (and block listen() on) more.
            while not draining.is_set():
                msg = await queue.get()
                if draining.is_set():
                    return
                self.in_flight += 1
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
                    self._shared.fail(convert(exc, "consumer"))
                    return
                finally:
                    busy[index] = False
                    self.in_flight -= 1
                    if self.in_flight == 0 and draining.is_set():
                        self.drained.set()
        finally:
            await deadline.close()

    async def drain(self, tasks: list[asyncio.Task[None]], deadline: float) -> None:
        """Take no new message; let running handlers finish until ``deadline``, then cancel.

        Args:
            tasks: The worker tasks, by index.
            deadline: When to stop waiting (``time.monotonic()``).
        """
        self.draining.set()
        if self.in_flight == 0:
            self.drained.set()
        for busy, task in zip(self.busy, tasks, strict=True):
            if not busy:
                task.cancel()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                await self.drained.wait()
        for task in tasks:
            task.cancel()

    async def _process(self, msg: Message, deadline: Deadline) -> None:
        if (msg.stream, msg.id) in self._suspects:
            if msg._deliveries < 2:
                # Back once: most likely it sat in a buffer at a restart, or one
                # crash caught it. Run it as usual, counting the start.
                await self._deliveries.start_suspect(msg)
                await self._handle(msg, deadline)
                return
            # Back again after starting here: a crash loop. One such suspect at a
            # time, each acked before the next starts: a message that kills the
            # process then takes down no other, so crashes charge it alone.
            async with self._suspect_lock:
                await self._deliveries.start_suspect(msg)
                await self._handle(msg, deadline)
                if self._acker.pending:
                    await self._acker.wait_idle()
            return
        await self._handle(msg, deadline)

    async def _handle(self, msg: Message, deadline: Deadline) -> None:
        sub = self._subs[msg.stream]
        max_retry = self._opts.max_retry
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
        self._settle(msg, result)
        if result.retry and max_retry >= 0 and msg.retry_count >= max_retry:
            await self._dead_letter(msg, sub, result.error, deadline)

    async def _call(self, call: HandlerFunc, msg: Message, deadline: Deadline) -> Result:
        """Run a handler under ``handler_timeout`` and map its outcome to a Result.

        The worker's :class:`Deadline` holds an ``asyncio.timeout`` scope that is
        rescheduled only when the running handler is overdue: ``asyncio.timeout``
        then cancels the handler and, when the scope is left here, turns the
        cancellation into ``TimeoutError``, or lets it through when the consumer
        itself is being cancelled too.
        """
        timeout = self._opts.handler_timeout
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

    def _settle(self, msg: Message, result: Result) -> None:
        """Ack, schedule a retry, or leave for dead-lettering, and report."""
        error = result.error
        if error is None:
            self._counts["succeeded"] += 1
            self._ack(msg)
            return
        max_retry = self._opts.max_retry
        exhausted = max_retry >= 0 and msg.retry_count >= max_retry
        retrying = result.retry and not exhausted
        cause = _cause(error)
        if isinstance(error, _Panic):
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
            self._retry_later(msg, result)

    def _retry_later(self, msg: Message, result: Result) -> None:
        delay = result.backoff
        if delay is None:
            delay = self._opts.backoff.for_attempt(msg.retry_count)
        self._retrier.schedule(msg, delay)

    def _ack(self, msg: Message) -> None:
        self._acker.add(msg.stream, msg.id)
        self._release(msg)

    async def _dead_letter(
        self,
        msg: Message,
        sub: Subscription,
        error: BaseException | None,
        deadline: Deadline,
        *,
        raw_fields: list[Any] | None = None,
    ) -> None:
        """Give an exhausted message to the dead-letter handler, or the dead-letter stream."""
        error = _cause(error)
        opts = self._opts
        if sub.dead_letter is not None and raw_fields is None:
            self._report(
                DeadLetteredError(
                    f"message {msg.id} of {msg.stream!r} exhausted max_retry="
                    f"{opts.max_retry}; passing it to the dead-letter handler",
                    message=msg,
                    error=error,
                )
            )
            token = dead_letter_call.set(True)
            try:
                result = await self._call(sub.dead_letter, msg, deadline)
            finally:
                dead_letter_call.reset(token)
            if result.ok:
                self._counts["dead_lettered"] += 1
                self._ack(msg)
            elif not result.retry:
                self._settle(msg, result)
            else:
                # Keep it: it comes back to the dead-letter handler after a backoff.
                self._counts["failed"] += 1
                cause = _cause(result.error)
                self._report(
                    HandlerError(
                        f"dead-letter handler for {msg.stream!r} failed: {cause} "
                        f"(message {msg.id})",
                        message=msg,
                        error=cause,
                        retrying=True,
                    )
                )
                self._retry_later(msg, result)
            return
        target = opts.dead_letter_stream_for(msg.stream)
        if target is not None:
            shared = self._shared
            fields = dead_letter_fields(msg, opts.group, opts.consumer, error, raw_fields)
            await shared.retry.call(
                f"XADD {target}",
                shared.transport.execute,
                *("XADD", target, "*", *fields),
                message=msg,
            )
        self._counts["dead_lettered"] += 1
        why = "is malformed" if raw_fields is not None else f"exhausted max_retry={opts.max_retry}"
        where = f"; appended to {target!r}" if target else "; dropped (dead_letter_stream=None)"
        self._report(
            DeadLetteredError(
                f"message {msg.id} of {msg.stream!r} {why}{where}",
                message=msg,
                error=error,
                dead_letter_stream=target,
            )
        )
        # Acked only after the dead-letter entry is stored: a crash in between
        # duplicates the dead letter at worst, never loses the message.
        self._ack(msg)


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


def _cause(error: BaseException | None) -> BaseException | None:
    """The handler's own error behind an internal marker."""
    if isinstance(error, _Panic | _Timeout):
        return error.error
    return error
