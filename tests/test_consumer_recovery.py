"""Recovery: a restarted consumer re-reads its own pending entries, live consumers claim
a dead one's idle entries, and never claim what a live consumer still holds."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio
from helpers import add, drain_errors, make_consumer, pending, pending_count, wait_until

from streamq import Message, MessageLostError, Result, fail, success

pytestmark = pytest.mark.anyio

Client = redis.asyncio.Redis


async def _crash_after_reading(client: Client, stream: str, consumer: str, count: int) -> None:
    """Read ``count`` entries as ``consumer`` and never ack them: a consumer that died."""
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    await client.xreadgroup("g", consumer, {stream: ">"}, count=count)


async def test_own_pending_reprocessed_first_on_restart(
    redis_client: Client, stream_name: str
) -> None:
    old = await add(redis_client, stream_name, 3)
    await _crash_after_reading(redis_client, stream_name, "c1", 3)
    new = await add(redis_client, stream_name, 2)
    seen: list[tuple[str, int]] = []

    async def handler(msg: Message) -> None:
        seen.append((msg.id, msg.deliveries))

    # Same name as the crashed one; claiming off, so only the restart path can find them.
    consumer = make_consumer(redis_client, consumer="c1", concurrency=1, claim_interval=0)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 5, what="5 acks")
    # Pending ones first (delivered for the second time), then the new ones.
    assert seen == [(i, 2) for i in old] + [(i, 1) for i in new]
    stats = consumer.stats()
    assert (stats.recovered, stats.read) == (3, 2)
    assert await pending_count(redis_client, stream_name) == 0


async def test_recovered_entries_least_charged_first(
    redis_client: Client, stream_name: str
) -> None:
    # After a crash loop the entries first in line were charged by every crash; the
    # least-charged go first so that the next crash does not charge the same ones.
    ids = await add(redis_client, stream_name, 4)
    await _crash_after_reading(redis_client, stream_name, "c1", 4)
    for entry_id, starts in zip(ids, (3, 1, 2, 1), strict=True):
        await redis_client.xclaim(
            stream_name, "g", "c1", 0, [entry_id], retrycount=starts, justid=True
        )
    seen: list[tuple[str, int]] = []

    async def handler(msg: Message) -> None:
        seen.append((msg.id, msg.deliveries))

    consumer = make_consumer(
        redis_client, consumer="c1", concurrency=1, claim_interval=0, max_retry=-1
    )
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 4, what="4 acks")
    # Each start is counted in Redis before the handler runs: deliveries = starts + 1.
    assert seen == [(ids[1], 2), (ids[3], 2), (ids[2], 3), (ids[0], 4)]
    assert await pending_count(redis_client, stream_name) == 0
    assert drain_errors(consumer) == []


async def test_restart_under_another_name_does_not_take_them(
    redis_client: Client, stream_name: str
) -> None:
    await add(redis_client, stream_name, 2)
    await _crash_after_reading(redis_client, stream_name, "c1", 2)
    seen: list[str] = []

    async def handler(msg: Message) -> None:
        seen.append(msg.id)

    consumer = make_consumer(redis_client, consumer="other", claim_interval=0)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(
            lambda: consumer.stats().recovered == 0 and consumer.state.value == "running"
        )
        new = await add(redis_client, stream_name, 1)
        await wait_until(lambda: consumer.stats().acked == 1)
    assert seen == new
    assert {r["consumer"] for r in await pending(redis_client, stream_name)} == {"c1"}


async def test_recovered_messages_count_towards_max_retry(
    redis_client: Client, stream_name: str
) -> None:
    # Crashes count: an entry delivered more than max_retry + 1 times is dead-lettered
    # without another handler call.
    [entry_id] = await add(redis_client, stream_name, 1)
    await _crash_after_reading(redis_client, stream_name, "c1", 1)
    for _ in range(2):  # each XCLAIM counts a delivery
        await redis_client.xclaim(stream_name, "g", "c1", 0, [entry_id])
    calls = 0

    async def handler(msg: Message) -> None:
        nonlocal calls
        calls += 1

    # Redis has counted 3 deliveries; recovery makes it 4 > max_retry + 1 = 2.
    consumer = make_consumer(redis_client, consumer="c1", max_retry=1, claim_interval=0)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 1)
    assert calls == 0
    assert await redis_client.xlen(f"{stream_name}:dead") == 1
    assert await pending_count(redis_client, stream_name) == 0


async def test_claims_idle_entries_of_a_dead_consumer(
    redis_client: Client, stream_name: str
) -> None:
    ids = await add(redis_client, stream_name, 3)
    await _crash_after_reading(redis_client, stream_name, "dead", 3)
    seen: list[tuple[str, int]] = []

    async def handler(msg: Message) -> None:
        seen.append((msg.id, msg.deliveries))

    consumer = make_consumer(
        redis_client,
        consumer="alive",
        pending_timeout=0.2,
        handler_timeout=0.1,
        claim_interval=0.05,
    )
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 3, what="claimed entries handled")
    assert sorted(seen) == [(i, 2) for i in ids]
    assert consumer.stats().claimed == 3
    assert await pending_count(redis_client, stream_name) == 0


async def test_claim_interval_zero_never_claims(redis_client: Client, stream_name: str) -> None:
    await add(redis_client, stream_name, 2)
    await _crash_after_reading(redis_client, stream_name, "dead", 2)

    async def handler(msg: Message) -> None:
        return None

    consumer = make_consumer(
        redis_client, consumer="alive", pending_timeout=0.01, handler_timeout=0, claim_interval=0
    )
    consumer.subscribe(stream_name, handler)
    async with consumer:
        new = await add(redis_client, stream_name, 1)
        await wait_until(lambda: consumer.stats().acked == 1)
        # Long enough for many claim rounds had claiming been on.
        await asyncio.sleep(0.3)
    assert consumer.stats().claimed == 0
    rows = await pending(redis_client, stream_name)
    assert {r["consumer"] for r in rows} == {"dead"}
    assert new[0] not in {r["id"] for r in rows}


async def test_live_consumer_entries_are_not_claimed(
    redis_client: Client, stream_name: str
) -> None:
    """Entries a live consumer holds (running, buffered, waiting to retry) are renewed."""
    ids = await add(redis_client, stream_name, 4)
    release = asyncio.Event()
    running: list[str] = []

    async def slow(msg: Message) -> Result:
        if msg.id == ids[0] and msg.deliveries == 1:
            return fail("retry much later", backoff=3600)
        running.append(msg.id)
        await release.wait()
        return success()

    timing = {"pending_timeout": 0.5, "handler_timeout": 0, "claim_interval": 0.05}
    holder = make_consumer(redis_client, consumer="holder", start_id="0", concurrency=1, **timing)
    holder.subscribe(stream_name, slow)
    stolen: list[str] = []

    async def thief_handler(msg: Message) -> None:
        stolen.append(msg.id)

    thief = make_consumer(redis_client, consumer="thief", **timing)
    thief.subscribe(stream_name, thief_handler)
    async with holder:
        # ids[0] waits for its retry, ids[1] runs, ids[2:] are buffered.
        await wait_until(lambda: running == [ids[1]] and holder.stats().waiting_retry == 1)
        assert holder.stats().buffered == 2
        async with thief:
            # Several pending_timeouts and many claim rounds.
            await asyncio.sleep(1.2)
            assert stolen == []
            assert thief.stats().claimed == 0
            rows = await pending(redis_client, stream_name)
            assert sorted(r["id"] for r in rows) == ids
            assert {r["consumer"] for r in rows} == {"holder"}
            # Renewed: none of them looks idle.
            assert all(r["idle"] < 500 for r in rows), rows
        release.set()
        await wait_until(lambda: holder.stats().acked == 3)
    assert [r["id"] for r in await pending(redis_client, stream_name)] == [ids[0]]


async def test_claimed_entry_deleted_from_stream_is_reported(
    redis_client: Client, stream_name: str
) -> None:
    ids = await add(redis_client, stream_name, 2)
    await _crash_after_reading(redis_client, stream_name, "dead", 2)
    await redis_client.xdel(stream_name, ids[0])

    async def handler(msg: Message) -> None:
        return None

    consumer = make_consumer(
        redis_client, consumer="alive", pending_timeout=0.05, handler_timeout=0, claim_interval=0.05
    )
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().lost == 1 and consumer.stats().acked >= 1)
        await wait_until(lambda: _empty(redis_client, stream_name))
    lost = [e for e in drain_errors(consumer) if isinstance(e, MessageLostError)]
    assert [(e.stream, e.entry_id) for e in lost] == [(stream_name, ids[0])]


async def _empty(client: Client, stream: str) -> bool:
    return await pending_count(client, stream) == 0
