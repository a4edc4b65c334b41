"""Messages waiting out a retry backoff do not count against ``buffer_size + concurrency``.

They keep only their stream, ID and delivery count, count against a separate
retry limit, are renewed like every held message (never claimed by another
consumer, nor re-taken by this one as orphans) and come back exactly once.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import redis.asyncio
from helpers import add, make_consumer, pending, pending_count, wait_until

import streamq._holding
from streamq import AsyncConsumer, Message, Result, fail

pytestmark = pytest.mark.anyio

Client = redis.asyncio.Redis

BUFFER, CONCURRENCY = 5, 2
CAPACITY = BUFFER + CONCURRENCY


def _held(consumer: AsyncConsumer) -> int:
    holding = consumer._holding
    return len(holding.messages) + holding.reserved


async def test_the_reader_keeps_reading_while_retries_wait(
    redis_client: Client, stream_name: str
) -> None:
    # Every first delivery fails with a backoff far beyond the test: before, the
    # reader stopped at `capacity` waiting retries; now it reads the whole stream.
    n = 300
    ids = await add(redis_client, stream_name, n)
    peak_held = 0

    async def failing(msg: Message) -> Result:
        nonlocal peak_held
        peak_held = max(peak_held, _held(consumer))
        return fail("not yet", backoff=3600)

    consumer = make_consumer(
        redis_client, start_id="0", buffer_size=BUFFER, concurrency=CONCURRENCY
    )
    consumer.subscribe(stream_name, failing)
    async with consumer:

        def all_waiting() -> bool:
            nonlocal peak_held
            peak_held = max(peak_held, _held(consumer))
            stats = consumer.stats()
            return stats.read == n and stats.waiting_retry == n

        await wait_until(all_waiting, interval=0.001, what=f"{n} retries waiting")
        stats = consumer.stats()
        assert (stats.in_flight, stats.buffered, stats.acked) == (0, 0, 0)
        # Only IDs and delivery counts are kept for them, not the messages.
        assert consumer._holding.messages == {}
        assert set(consumer._holding.waiting.values()) == {1}
    assert peak_held <= CAPACITY
    # Closed while they waited: every entry stays pending for this consumer,
    # delivered once, for the next start.
    rows = await pending(redis_client, stream_name)
    assert sorted(row["id"] for row in rows) == sorted(ids)
    assert {(row["consumer"], row["deliveries"]) for row in rows} == {("c1", 1)}

    seen: Counter[str] = Counter()

    async def succeeding(msg: Message) -> None:
        seen[msg.id] += 1

    restarted = make_consumer(redis_client, start_id="0")
    restarted.subscribe(stream_name, succeeding)
    async with restarted:
        await wait_until(lambda: restarted.stats().acked == n, what="all handled after restart")
    assert seen == Counter(ids)
    assert await pending_count(redis_client, stream_name) == 0


async def test_waiting_retries_are_renewed_and_handled_once(
    redis_client: Client, stream_name: str
) -> None:
    # The backoff outlasts pending_timeout: without renewal c2 would claim the
    # waiting entries, and with them out of the buffer c1's own orphan claim
    # (command_timeout < pending_timeout) must still leave them alone.
    n = 50
    ids = await add(redis_client, stream_name, n)
    calls: Counter[tuple[str, str, int]] = Counter()

    def handler(name: str) -> Any:
        async def handle(msg: Message) -> Result | None:
            calls[(name, msg.id, msg.deliveries)] += 1
            if msg.deliveries == 1:
                return fail("once", backoff=2.0)
            return None

        return handle

    timing = {"pending_timeout": 1.0, "handler_timeout": 0.3, "claim_interval": 0.1}
    c1 = make_consumer(
        redis_client,
        consumer="c1",
        start_id="0",
        buffer_size=BUFFER,
        concurrency=CONCURRENCY,
        command_timeout=0.3,
        **timing,
    )
    c1.subscribe(stream_name, handler("c1"))
    c2 = make_consumer(redis_client, consumer="c2", start_id="0", **timing)
    c2.subscribe(stream_name, handler("c2"))

    async def settled() -> bool:
        acked = c1.stats().acked + c2.stats().acked
        return acked >= n and not await pending_count(redis_client, stream_name)

    async with c1:
        await wait_until(lambda: c1.stats().waiting_retry == n, what=f"{n} retries waiting")
        async with c2:
            await wait_until(settled, what="every entry acked")
            assert c2.stats().claimed == 0
    assert c1.stats().claimed == 0
    assert c1.stats().retried == n
    assert calls == Counter({("c1", i, d): 1 for i in ids for d in (1, 2)})
    assert await pending_count(redis_client, stream_name) == 0


async def test_reading_pauses_at_the_retry_limit(
    redis_client: Client, stream_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 20
    monkeypatch.setattr(streamq._holding, "retry_limit", lambda capacity: limit)
    n = 200
    ids = await add(redis_client, stream_name, n)
    peak_waiting = peak_held = 0
    seen: Counter[str] = Counter()

    def sample() -> None:
        nonlocal peak_waiting, peak_held
        peak_waiting = max(peak_waiting, len(consumer._holding.waiting))
        peak_held = max(peak_held, _held(consumer))

    async def handler(msg: Message) -> Result | None:
        sample()
        if msg.deliveries == 1:
            return fail("once", backoff=0.05)
        seen[msg.id] += 1
        return None

    consumer = make_consumer(
        redis_client, start_id="0", buffer_size=BUFFER, concurrency=CONCURRENCY
    )
    consumer.subscribe(stream_name, handler)
    async with consumer:

        def done() -> bool:
            sample()
            return consumer.stats().acked == n

        await wait_until(done, interval=0.001, what="all handled")
    assert seen == Counter(ids)
    assert consumer.stats().retried == n
    # The limit was reached, and exceeded only by what was held when it was.
    assert limit <= peak_waiting <= limit + 2 * CAPACITY
    # Retries coming back may fill a second buffer's worth, no more.
    assert peak_held <= 2 * CAPACITY
    assert await pending_count(redis_client, stream_name) == 0


async def test_an_ordered_retry_deleted_while_waiting_unblocks_its_key(
    redis_client: Client, stream_name: str
) -> None:
    # The first message of a key fails; the second waits behind it. The first is
    # deleted from the stream during its backoff: it is reported lost, and the
    # second, no longer blocked, runs.
    ids = await add(redis_client, stream_name, 2, **{"streamq-key": "k"})
    handled: list[str] = []

    async def handler(msg: Message) -> Result | None:
        if msg.id == ids[0]:
            await redis_client.xdel(stream_name, ids[0])
            return fail("deleted meanwhile", backoff=0.05)
        handled.append(msg.id)
        return None

    consumer = make_consumer(redis_client, start_id="0")
    consumer.subscribe(stream_name, handler, ordered_by_key=True)
    async with consumer:
        await wait_until(lambda: handled == [ids[1]], what="the second message of the key")
        await wait_until(lambda: consumer.stats().lost == 1, what="the first reported lost")
    assert consumer._holding.lanes.parked == 0
    assert await pending_count(redis_client, stream_name) == 0
