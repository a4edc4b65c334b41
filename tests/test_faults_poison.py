"""Poison messages: handlers that always raise, always time out, or kill the process.

Each ends in the dead-letter stream (or the dead-letter handler) after max_retry
with the last error, while the other messages flow past it; dead-lettering stores
the dead letter before it acks, so a failed append leaves the message pending.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from faults.harness import (
    Worker,
    dead_letters,
    group_caught_up,
    pending_by_consumer,
    pending_count,
    wait_until,
)

from streamq import (
    AsyncConsumer,
    Backoff,
    DeadLetteredError,
    Message,
    RedisError,
    StreamqError,
)
from streamq._servers import LocalRedis

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

FAST = Backoff(min=0.05, max=0.05)


def _consumer(server: LocalRedis, **kw: object) -> AsyncConsumer:
    options: dict[str, object] = {
        "group": "g",
        "consumer": "c1",
        "start_id": "0",
        "read_timeout": 0.2,
        "max_retry": 2,
        "backoff": FAST,
        "concurrency": 1,
    }
    options.update(kw)
    return AsyncConsumer(redis=server.url, **options)


def _publish(server: LocalRedis, stream: str, n: int, **poison: str) -> list[str]:
    fields = [x for kv in poison.items() for x in kv]
    return [str(server.execute("XADD", stream, "*", "n", str(i), *fields)) for i in range(n)]


@pytest.mark.parametrize("kind", ["raise", "timeout"])
async def test_poison_is_dead_lettered_with_its_last_error_and_blocks_nothing(
    redis_server: LocalRedis, stream_name: str, kind: str
) -> None:
    poison = _publish(redis_server, stream_name, 1, poison=kind)[0]
    normal = _publish(redis_server, stream_name, 20)
    calls: list[tuple[str, int]] = []

    async def handler(msg: Message) -> None:
        calls.append((msg.id, msg.deliveries))
        if msg.id == poison:
            if kind == "raise":
                raise ValueError(f"cannot parse {msg.id}")
            await asyncio.sleep(3600)

    # One worker: the poison's retries must not stand in the way of the others.
    consumer = _consumer(redis_server, handler_timeout=0.2, pending_timeout=1.0)
    consumer.subscribe(stream_name, handler)
    async with consumer:

        async def dead() -> bool:
            return poison in dead_letters(redis_server, stream_name)

        await wait_until(dead, 10, "the poison is dead-lettered")
        await wait_until(_drained(redis_server, stream_name), 5, "nothing pending")
    assert [d for i, d in calls if i == poison] == [1, 2, 3]
    assert {i for i, _ in calls} == {poison, *normal}
    # The others went by while the poison waited for its retries.
    first_retry = calls.index((poison, 2))
    assert {i for i, _ in calls[:first_retry]} == {poison, *normal}
    letter = dead_letters(redis_server, stream_name)[poison]
    expected = "ValueError: cannot parse" if kind == "raise" else "TimeoutError"
    assert letter["streamq-error"].startswith(expected), letter
    assert letter["streamq-deliveries"] == "3"
    assert letter["poison"] == kind
    assert letter["streamq-original-stream"] == stream_name
    assert consumer.stats().dead_lettered == 1


async def test_poison_that_kills_the_process_is_dead_lettered(
    redis_server: LocalRedis, stream_name: str, tmp_path: Path
) -> None:
    redis_server.execute("XGROUP", "CREATE", stream_name, "g", "0", "MKSTREAM")
    before = _publish(redis_server, stream_name, 5)
    poison = _publish(redis_server, stream_name, 1, poison="exit")[0]
    after = _publish(redis_server, stream_name, 5)
    # The poison runs at most max_retry + 1 = 3 times, each time killing the process.
    worker = Worker(
        tmp_path, "w0", redis_server.url, [stream_name], options={"max_retry": 2, "concurrency": 1}
    )
    worker.start()
    deaths = 0

    async def settled() -> bool:
        nonlocal deaths
        if not worker.alive:
            deaths += 1
            worker.start()
        return poison in dead_letters(redis_server, stream_name) and not pending_count(
            redis_server, stream_name
        )

    await wait_until(settled, 30, "the process-killing poison is dead-lettered")
    assert await worker.terminate() == 0, worker.stderr()
    assert deaths == 3
    assert set(worker.handled()) == set(before + after)
    letter = dead_letters(redis_server, stream_name)[poison]
    assert "delivered 4 times without being acknowledged" in letter["streamq-error"]


async def test_dead_letter_handler_gets_exhausted_messages(
    redis_server: LocalRedis, stream_name: str
) -> None:
    poison = _publish(redis_server, stream_name, 1, poison="raise")[0]
    normal = _publish(redis_server, stream_name, 3)
    dead: list[tuple[str, int]] = []

    async def handler(msg: Message) -> None:
        if msg.values.get("poison"):
            raise RuntimeError("always")

    async def dead_letter(msg: Message) -> None:
        dead.append((msg.id, msg.deliveries))

    consumer = _consumer(redis_server)
    consumer.subscribe(stream_name, handler, dead_letter)
    reports: list[StreamqError] = []
    async with consumer:
        await wait_until(_drained(redis_server, stream_name), 10, "nothing pending")
        while (err := consumer.errors().get_nowait()) is not None:
            reports.append(err)
    assert dead == [(poison, 3)]
    assert normal  # handled by the ordinary handler
    assert not _exists(redis_server, f"{stream_name}:dead")
    reported = [e for e in reports if isinstance(e, DeadLetteredError)]
    assert len(reported) == 1
    assert isinstance(reported[0].error, RuntimeError)


async def test_a_failed_dead_letter_append_never_acks(
    redis_server: LocalRedis, stream_name: str
) -> None:
    """Append first, then ack: when the append fails, the message stays pending."""
    redis_server.execute("SET", f"{stream_name}:dead", "not a stream")
    poison = _publish(redis_server, stream_name, 1, poison="raise")[0]

    async def handler(msg: Message) -> None:
        raise RuntimeError("always")

    consumer = _consumer(redis_server)
    consumer.subscribe(stream_name, handler)
    with pytest.raises(RedisError, match="WRONGTYPE"):
        await asyncio.wait_for(consumer.listen(), 10)
    assert pending_by_consumer(redis_server, stream_name) == {"c1": [poison]}


def _drained(server: LocalRedis, stream: str):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return group_caught_up(server, stream)

    return check


def _exists(server: LocalRedis, key: str) -> bool:
    return bool(server.execute("EXISTS", key))


async def test_messages_left_pending_by_a_graceful_stop_run_concurrently_after_it(
    redis_server: LocalRedis, stream_name: str
) -> None:
    """Only a crash loop serializes recovery; an ordinary restart keeps its concurrency."""
    _publish(redis_server, stream_name, 9)
    gate = asyncio.Event()

    async def blocked(msg: Message) -> None:
        await gate.wait()

    first = _consumer(redis_server, concurrency=1, buffer_size=8, shutdown_timeout=0.1)
    first.subscribe(stream_name, blocked)
    async with first:

        async def buffered() -> bool:
            return first.stats().buffered == 8

        await wait_until(buffered, 5, "eight buffered")
    assert pending_count(redis_server, stream_name) == 9
    running = peak = 0

    async def handler(msg: Message) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    second = _consumer(redis_server, concurrency=4)
    second.subscribe(stream_name, handler)
    async with second:
        await wait_until(_drained(redis_server, stream_name), 10, "all handled")
    assert second.stats().recovered == 9
    assert peak == 4
