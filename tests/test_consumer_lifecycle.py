"""Consumer lifecycle: aclose(), async with, fatal errors, errors(), stats(), vanished groups."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
import redis.asyncio
from helpers import add, drain_errors, make_consumer, pending, pending_count, wait_group, wait_until

from streamq import (
    ClosedError,
    ConsumerState,
    DeadLetteredError,
    GroupRecreatedError,
    HandlerError,
    HandlerPanic,
    Message,
    RedisError,
    Result,
    StreamqError,
    discard,
    fail,
)
from streamq._servers import LocalRedis

pytestmark = pytest.mark.anyio

Client = redis.asyncio.Redis


async def _noop(msg: Message) -> None:
    return None


# -- aclose ---------------------------------------------------------------------------


async def test_aclose_stops_listen_which_returns_none(
    redis_client: Client, stream_name: str
) -> None:
    consumer = make_consumer(redis_client)
    consumer.subscribe(stream_name, _noop)
    task = asyncio.create_task(consumer.listen())
    await wait_group(redis_client, stream_name)
    assert consumer.state is ConsumerState.RUNNING
    await consumer.aclose()
    assert task.done()
    assert await task is None
    assert consumer.state is ConsumerState.CLOSED
    await consumer.aclose()  # idempotent
    with pytest.raises(ClosedError):
        await consumer.listen()
    with pytest.raises(ClosedError):
        consumer.subscribe("other", _noop)
    with pytest.raises(ClosedError):
        async with consumer:
            pass


async def test_listen_twice_is_refused(redis_client: Client, stream_name: str) -> None:
    consumer = make_consumer(redis_client)
    consumer.subscribe(stream_name, _noop)
    async with consumer:
        await wait_group(redis_client, stream_name)
        with pytest.raises(ClosedError):
            await consumer.listen()
        with pytest.raises(ClosedError):
            consumer.subscribe("other", _noop)


async def test_aclose_finishes_in_flight_and_leaves_buffered_pending(
    redis_client: Client, stream_name: str
) -> None:
    ids = await add(redis_client, stream_name, 10)
    started = asyncio.Event()
    release = asyncio.Event()
    handled: list[str] = []

    async def handler(msg: Message) -> None:
        started.set()
        await release.wait()
        handled.append(msg.id)

    consumer = make_consumer(redis_client, start_id="0", concurrency=1, buffer_size=4)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await started.wait()
        await wait_until(lambda: consumer.stats().buffered == 4)
        closing = asyncio.create_task(consumer.aclose())
        await wait_until(lambda: consumer.state is not ConsumerState.RUNNING)
        assert not closing.done()  # waits for the running handler
        release.set()
        await asyncio.wait_for(closing, 5)
    # The running handler finished and was acked; nothing else was started.
    assert handled == [ids[0]]
    assert consumer.stats().acked == 1
    rows = await pending(redis_client, stream_name)
    # The buffered ones stay pending under this consumer, for its next start.
    assert [r["id"] for r in rows] == ids[1:5]
    assert {(r["consumer"], r["deliveries"]) for r in rows} == {("c1", 1)}

    # A restart under the same name picks them up first, then the unread rest.
    seen: list[str] = []

    async def again(msg: Message) -> None:
        seen.append(msg.id)

    restarted = make_consumer(redis_client, start_id="0", concurrency=1)
    restarted.subscribe(stream_name, again)
    async with restarted:
        await wait_until(lambda: restarted.stats().acked == 9)
    assert seen == ids[1:]
    assert await pending_count(redis_client, stream_name) == 0


async def test_aclose_flushes_every_ack(redis_client: Client, stream_name: str) -> None:
    await add(redis_client, stream_name, 300)

    consumer = make_consumer(redis_client, start_id="0", concurrency=20)
    consumer.subscribe(stream_name, _noop)
    async with consumer:
        await wait_until(lambda: consumer.stats().handled == 300)
    # Every success acked by the time aclose() returns: no wait needed here.
    assert consumer.stats().pending_acks == 0
    assert await pending_count(redis_client, stream_name) == 0


async def test_aclose_returns_within_shutdown_timeout(
    redis_client: Client, stream_name: str
) -> None:
    [entry_id] = await add(redis_client, stream_name, 1)
    started = asyncio.Event()
    stop_ignoring = asyncio.Event()
    cancellations = 0

    async def stubborn(msg: Message) -> None:
        nonlocal cancellations
        started.set()
        while not stop_ignoring.is_set():
            try:
                await stop_ignoring.wait()
            except asyncio.CancelledError:
                cancellations += 1  # ignores cancellation: a badly written handler

    consumer = make_consumer(redis_client, start_id="0", shutdown_timeout=0.3)
    consumer.subscribe(stream_name, stubborn)
    task = asyncio.create_task(consumer.listen())
    await started.wait()
    begun = time.monotonic()
    await asyncio.wait_for(consumer.aclose(), 5)
    assert time.monotonic() - begun < 5
    assert cancellations >= 1
    # Never acked: it did not finish.
    assert [r["id"] for r in await pending(redis_client, stream_name)] == [entry_id]
    # Let the handler end so that no task outlives the test.
    stop_ignoring.set()
    await asyncio.wait_for(task, 5)
    assert consumer.state is ConsumerState.CLOSED


async def test_shutdown_timeout_cancels_slow_handlers(
    redis_client: Client, stream_name: str
) -> None:
    [entry_id] = await add(redis_client, stream_name, 1)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(msg: Message) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    consumer = make_consumer(redis_client, start_id="0", shutdown_timeout=0.1)
    consumer.subscribe(stream_name, slow)
    async with consumer:
        await started.wait()
    assert cancelled.is_set()
    assert [r["id"] for r in await pending(redis_client, stream_name)] == [entry_id]
    assert consumer.state is ConsumerState.CLOSED


# -- fatal errors ------------------------------------------------------------------------


async def test_async_with_reraises_fatal_error_after_cleanup(
    redis_client: Client, stream_name: str
) -> None:
    await redis_client.set(stream_name, "not a stream")
    consumer = make_consumer(redis_client)
    consumer.subscribe(stream_name, _noop)

    async def run() -> None:
        async with consumer:
            await wait_until(lambda: consumer.state is ConsumerState.CLOSED, what="fatal stop")

    with pytest.raises(RedisError, match="WRONGTYPE") as info:
        await run()
    assert isinstance(info.value.__cause__, redis.ResponseError)
    assert consumer.state is ConsumerState.CLOSED
    # errors() has ended.
    assert [e async for e in consumer.errors()] == []
    assert await redis_client.get(stream_name) == b"not a stream"


async def test_listen_raises_fatal_error(redis_client: Client, stream_name: str) -> None:
    await redis_client.set(stream_name, "not a stream")
    consumer = make_consumer(redis_client)
    consumer.subscribe(stream_name, _noop)
    with pytest.raises(RedisError, match="WRONGTYPE"):
        await asyncio.wait_for(consumer.listen(), 10)
    await consumer.aclose()


async def test_fatal_error_while_running(redis_client: Client, stream_name: str) -> None:
    release = asyncio.Event()
    done: list[str] = []

    async def handler(msg: Message) -> None:
        await release.wait()
        done.append(msg.id)

    consumer = make_consumer(redis_client, read_timeout=0.05)
    consumer.subscribe(stream_name, handler)

    async def run() -> None:
        async with consumer:
            await wait_group(redis_client, stream_name)
            ids = await add(redis_client, stream_name, 1)
            await wait_until(lambda: consumer.stats().in_flight == 1)
            # The stream becomes a string while a handler runs.
            await redis_client.rename(stream_name, f"{stream_name}:moved")
            await redis_client.set(stream_name, "string")
            release.set()
            await wait_until(lambda: consumer.state is ConsumerState.CLOSED, what="fatal stop")
            assert done == ids

    with pytest.raises(RedisError, match="WRONGTYPE"):
        await run()


class _Abort(BaseException):
    """Not an Exception: like KeyboardInterrupt or SystemExit, it must not be swallowed."""


async def test_a_base_exception_from_a_handler_is_raised_bare_after_cleanup(
    redis_client: Client, stream_name: str
) -> None:
    ids = await add(redis_client, stream_name, 3)

    async def handler(msg: Message) -> None:
        if msg.id == ids[2]:
            raise _Abort("stop the process")

    consumer = make_consumer(redis_client, start_id="0", concurrency=1)
    consumer.subscribe(stream_name, handler)
    with pytest.raises(_Abort, match="stop the process"):
        await asyncio.wait_for(consumer.listen(), 10)
    assert consumer.state is ConsumerState.CLOSED
    # The usual cleanup ran: the finished messages are acked, the interrupted one
    # stays pending for the next start.
    assert [entry["id"] for entry in await pending(redis_client, stream_name)] == [ids[2]]
    assert consumer.stats().acked == 2
    await consumer.aclose()


# -- vanished groups and streams ------------------------------------------------------


@pytest.mark.parametrize("how", ["delete-stream", "destroy-group"])
async def test_vanished_group_is_recreated(
    redis_client: Client, stream_name: str, how: str
) -> None:
    seen: list[str] = []

    async def handler(msg: Message) -> None:
        seen.append(msg.id)

    consumer = make_consumer(redis_client)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_group(redis_client, stream_name)
        first = await add(redis_client, stream_name, 1)
        await wait_until(lambda: seen == first)
        if how == "delete-stream":
            await redis_client.delete(stream_name)
        else:
            await redis_client.xgroup_destroy(stream_name, "g")
        await wait_until(
            lambda: any(isinstance(e, GroupRecreatedError) for e in drain_errors(consumer)),
            what="GroupRecreatedError",
        )
        assert consumer.state is ConsumerState.RUNNING
        second = await add(redis_client, stream_name, 2)
        await wait_until(lambda: seen == first + second, what="messages after recreation")
        await wait_until(lambda: _no_pending(redis_client, stream_name))


async def _no_pending(client: Client, stream: str) -> bool:
    return await pending_count(client, stream) == 0


# -- errors() -------------------------------------------------------------------------


async def test_unread_errors_never_stall_processing(redis_client: Client, stream_name: str) -> None:
    await add(redis_client, stream_name, 200)

    async def handler(msg: Message) -> Result:
        return discard("unwanted")

    consumer = make_consumer(redis_client, start_id="0", error_buffer=5)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 200, what="200 acks")
    stats = consumer.stats()
    assert (stats.errors_reported, stats.errors_dropped) == (200, 195)
    # The newest five are kept, then iteration ends (the consumer is closed).
    kept = [e async for e in consumer.errors()]
    assert len(kept) == 5
    assert all(isinstance(e, HandlerError) for e in kept)
    assert [e.message.text("n") for e in kept if e.message] == [str(i) for i in range(195, 200)]
    assert consumer.errors().statistics().dropped == 195
    assert await pending_count(redis_client, stream_name) == 0


async def test_errors_iterator_sees_every_error_and_ends(
    redis_client: Client, stream_name: str
) -> None:
    await add(redis_client, stream_name, 3)
    got: list[StreamqError] = []

    async def handler(msg: Message) -> Result:
        if msg.text("n") == "0":
            raise ValueError("boom")
        return discard("no")

    consumer = make_consumer(redis_client, start_id="0", max_retry=0)
    consumer.subscribe(stream_name, handler)

    async def read() -> None:
        async for err in consumer.errors():
            got.append(err)

    reader = asyncio.create_task(read())
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 3)
    await asyncio.wait_for(reader, 5)  # ended by aclose()
    kinds = sorted(type(e).__name__ for e in got)
    assert kinds == ["DeadLetteredError", "HandlerError", "HandlerError", "HandlerPanic"]
    for err in got:
        assert err.message is not None
        assert err.message.stream == stream_name
        if not isinstance(err, DeadLetteredError):
            assert err.error is not None
            assert err.__cause__ is err.error


async def test_every_error_is_logged(
    redis_client: Client, stream_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    await add(redis_client, stream_name, 2)

    async def handler(msg: Message) -> Result:
        return fail("again") if msg.deliveries == 1 else discard("give up")

    caplog.set_level(logging.INFO, logger="streamq")
    consumer = make_consumer(redis_client, start_id="0")
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 2)
    records = [r for r in caplog.records if r.name == "streamq"]
    assert len(records) == consumer.stats().errors_reported == 4
    assert {getattr(r, "stream", None) for r in records} == {stream_name}


# -- stats() ---------------------------------------------------------------------------


async def test_stats(redis_client: Client, stream_name: str) -> None:
    await add(redis_client, stream_name, 6)

    async def handler(msg: Message) -> Result | None:
        n, first = msg.text("n"), msg.deliveries == 1
        if n == "2":
            return discard("bad")
        if n == "3" and first:
            return fail("later")
        if n == "4" and first:
            raise RuntimeError("panic")
        if n == "5":
            return fail("always")
        return None

    consumer = make_consumer(redis_client, start_id="0", max_retry=1)
    consumer.subscribe(stream_name, handler)
    assert consumer.stats().state is ConsumerState.NEW
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 6)
        assert consumer.stats().state is ConsumerState.RUNNING
    stats = consumer.stats()
    assert stats.state is ConsumerState.CLOSED
    assert (stats.read, stats.handled) == (6, 9)
    assert (stats.succeeded, stats.failed, stats.retried) == (4, 4, 3)
    assert (stats.discarded, stats.dead_lettered, stats.acked) == (1, 1, 6)
    assert (stats.claimed, stats.recovered, stats.lost) == (0, 0, 0)
    assert (stats.in_flight, stats.buffered, stats.waiting_retry, stats.pending_acks) == (
        0,
        0,
        0,
        0,
    )
    errors = drain_errors(consumer)
    assert stats.errors_reported == len(errors) == 6
    assert sum(isinstance(e, HandlerPanic) for e in errors) == 1
    assert stats.errors_dropped == 0


async def test_aclose_from_a_handler_stops_without_deadlock(
    redis_client: Client, stream_name: str
) -> None:
    ids = await add(redis_client, stream_name, 3)
    seen: list[str] = []
    consumer = make_consumer(redis_client, start_id="0", concurrency=1, shutdown_timeout=30)

    async def handler(msg: Message) -> None:
        seen.append(msg.id)
        await consumer.aclose()  # "stop after this one": returns at once

    consumer.subscribe(stream_name, handler)
    # Well within shutdown_timeout: the shutdown does not wait for itself.
    await asyncio.wait_for(consumer.listen(), 10)
    assert seen == [ids[0]]
    assert consumer.stats().acked == 1
    assert [r["id"] for r in await pending(redis_client, stream_name)] == ids[1:]
    assert drain_errors(consumer) == []


async def test_url_built_client_is_closed(
    redis_server: LocalRedis, redis_client: Client, stream_name: str
) -> None:
    name = f"owned-{stream_name[-8:]}"
    consumer = make_consumer(f"{redis_server.url}?client_name={name}")
    consumer.subscribe(stream_name, _noop)
    async with consumer:
        await wait_group(redis_client, stream_name)
        assert await _named(redis_client, name) > 0
    await wait_until(lambda: _named_is(redis_client, name, 0), timeout=5, what="closed")


async def _named(client: Client, name: str) -> int:
    return sum(1 for c in await client.client_list() if c.get("name") == name)


async def _named_is(client: Client, name: str, count: int) -> bool:
    return await _named(client, name) == count


async def test_two_consumers_share_the_work(redis_client: Client, stream_name: str) -> None:
    ids = await add(redis_client, stream_name, 200)
    seen: dict[str, list[str]] = {"a": [], "b": []}

    def handler(name: str) -> Any:
        async def handle(msg: Message) -> None:
            seen[name].append(msg.id)
            await asyncio.sleep(0.001)

        return handle

    first = make_consumer(redis_client, consumer="a", start_id="0", buffer_size=5)
    second = make_consumer(redis_client, consumer="b", start_id="0", buffer_size=5)
    first.subscribe(stream_name, handler("a"))
    second.subscribe(stream_name, handler("b"))
    async with first, second:
        await wait_until(lambda: len(seen["a"]) + len(seen["b"]) >= 200)
        await wait_until(lambda: _no_pending(redis_client, stream_name))
    # Each message handled exactly once, by one of them.
    both = seen["a"] + seen["b"]
    assert len(both) == len(ids)
    assert set(both) == set(ids)
    assert seen["a"]
    assert seen["b"]
