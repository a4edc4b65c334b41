"""handler_timeout through each worker's lazily armed deadline (see ``streamq._deadline``).

A worker arms one timer and re-arms it for whichever handler runs when it fires,
so these tests check the cases that shortcut could get wrong: handlers that
together outlast the timeout, a timeout after a timeout, a handler that swallows
the cancellation, the consumer being closed while a deadline is armed, and a
deadline that fires just as its handler ends.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import redis.asyncio
from helpers import add, drain_errors, make_consumer, pending_count, wait_until

from streamq import AsyncConsumer, HandlerError, Message

pytestmark = pytest.mark.anyio

Client = redis.asyncio.Redis


async def _settled(client: Client, stream: str, acked: int, consumer: AsyncConsumer) -> None:
    await wait_until(lambda: consumer.stats().acked >= acked, what=f"{acked} acks")
    await wait_until(lambda: _none_pending(client, stream), what="an empty pending list", timeout=5)


async def _none_pending(client: Client, stream: str) -> bool:
    return await pending_count(client, stream) == 0


async def test_handlers_that_together_outlast_the_timeout_are_not_cut(
    redis_client: Client, stream_name: str
) -> None:
    # One worker, handlers of a fifth of the timeout each: the timer armed for the
    # first one fires while a later one runs and must re-arm, not cancel it.
    await add(redis_client, stream_name, 8)
    seen: list[str] = []

    async def handler(msg: Message) -> None:
        await asyncio.sleep(0.06)
        seen.append(msg.text("n"))

    consumer = make_consumer(redis_client, start_id="0", concurrency=1, handler_timeout=0.3)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, 8, consumer)
    assert seen == [str(i) for i in range(8)]
    assert drain_errors(consumer) == []
    assert consumer.stats().retried == 0


async def test_every_timeout_fires_on_a_reused_worker(
    redis_client: Client, stream_name: str
) -> None:
    await add(redis_client, stream_name, 3)
    calls: list[tuple[str, int]] = []

    async def handler(msg: Message) -> None:
        calls.append((msg.text("n"), msg.deliveries))
        if msg.deliveries == 1:
            await asyncio.sleep(3600)

    consumer = make_consumer(redis_client, start_id="0", concurrency=1, handler_timeout=0.05)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, 3, consumer)
    errors = drain_errors(consumer)
    assert len(errors) == 3
    assert all(type(e) is HandlerError and isinstance(e.error, TimeoutError) for e in errors)
    assert sorted(calls) == [(str(n), d) for n in range(3) for d in (1, 2)]


async def test_a_handler_that_swallows_the_timeout_keeps_its_result(
    redis_client: Client, stream_name: str
) -> None:
    # Like asyncio.timeout: the cancellation request is withdrawn and the handler's
    # own outcome stands; the worker is not left half-cancelled for later messages.
    await add(redis_client, stream_name, 2)
    cancelling_after: list[int] = []

    async def handler(msg: Message) -> None:
        task = asyncio.current_task()
        assert task is not None
        if msg.text("n") == "0":
            # A handler that ignores cancellation (bad practice, but possible).
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)
        else:
            await asyncio.sleep(0)
            cancelling_after.append(task.cancelling())

    consumer = make_consumer(redis_client, start_id="0", concurrency=1, handler_timeout=0.05)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, 2, consumer)
    assert cancelling_after == [0]
    assert drain_errors(consumer) == []
    assert consumer.stats().succeeded == 2


async def test_close_during_an_armed_deadline_leaves_the_message_pending(
    redis_client: Client, stream_name: str
) -> None:
    # Shutdown cancels the handler; that is not a timeout: nothing is acked or
    # reported, the entry stays pending for the next start.
    await add(redis_client, stream_name, 1)
    started = asyncio.Event()

    async def handler(msg: Message) -> None:
        started.set()
        await asyncio.sleep(3600)

    consumer = make_consumer(redis_client, start_id="0", handler_timeout=30, shutdown_timeout=0.05)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await asyncio.wait_for(started.wait(), 10)
    assert consumer.stats().acked == 0
    assert drain_errors(consumer) == []
    assert await pending_count(redis_client, stream_name) == 1


async def test_a_deadline_that_fires_as_the_handler_ends_is_called_off() -> None:
    # The timer may fire up to its slack before the due time and leave the last
    # step to asyncio.timeout; a handler ending in between keeps its outcome and
    # the worker is not cancelled later by that stale deadline.
    from streamq._deadline import Deadline

    deadline = Deadline()
    await deadline.open()
    loop = asyncio.get_running_loop()
    deadline.due = loop.time() + 0.0005  # a handler runs, due within the timer's slack
    deadline._fire()
    assert deadline.fired
    assert await deadline.renew(None) is False
    await asyncio.sleep(0.01)  # would raise CancelledError if the scope still fired
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    await deadline.close()
