"""Pruning idle consumers: dead ones without pending entries leave the group, nothing else does.

Checked against what Redis holds: ``XINFO CONSUMERS`` and ``XPENDING``.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis.asyncio
from helpers import add, drain_errors, make_consumer, pending, pending_count, wait_until

from streamq import ConsumerOptions, Message

pytestmark = pytest.mark.anyio

Client = redis.asyncio.Redis


async def consumer_names(client: Client, stream: str, group: str = "g") -> set[str]:
    rows = await client.xinfo_consumers(stream, group)
    return {row["name"].decode() if isinstance(row["name"], bytes) else row["name"] for row in rows}


async def test_idle_consumers_without_pending_entries_are_deleted(
    redis_client: Client, stream_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    await add(redis_client, stream_name, 1)
    await redis_client.xgroup_create(stream_name, "g", id="0")
    # "holder" died holding the one entry; "gone", created after it, left nothing.
    # The round that finds "gone" idle long enough finds "holder" so too.
    await redis_client.xreadgroup("g", "holder", {stream_name: ">"})
    await redis_client.xgroup_createconsumer(stream_name, "g", "gone")
    handled: list[str] = []

    async def handler(msg: Message) -> None:
        handled.append(msg.id)

    # Claiming off: the holder's entry stays its own, so it must never be pruned.
    consumer = make_consumer(
        redis_client, read_timeout=0.05, claim_interval=0, prune_consumers_after=0.3
    )
    consumer.subscribe(stream_name, handler)
    caplog.set_level(logging.INFO, logger="streamq")
    async with consumer:
        await wait_until(lambda: consumer.stats().pruned == 1, what="the idle consumer pruned")
        assert await consumer_names(redis_client, stream_name) == {"c1", "holder"}
        assert [r["consumer"] for r in await pending(redis_client, stream_name)] == ["holder"]
    assert handled == []
    assert drain_errors(consumer) == []
    [record] = [r for r in caplog.records if "deleted consumer" in r.getMessage()]
    assert "'gone'" in record.getMessage()
    assert record.stream == stream_name  # type: ignore[attr-defined]


async def test_a_dead_consumer_is_pruned_once_its_entries_were_claimed(
    redis_client: Client, stream_name: str
) -> None:
    ids = await add(redis_client, stream_name, 3)
    await redis_client.xgroup_create(stream_name, "g", id="0")
    await redis_client.xreadgroup("g", "crashed", {stream_name: ">"})
    handled: list[str] = []

    async def handler(msg: Message) -> None:
        handled.append(msg.id)

    consumer = make_consumer(
        redis_client,
        read_timeout=0.05,
        handler_timeout=0.2,
        pending_timeout=0.2,
        claim_interval=0.05,
        prune_consumers_after=0.3,
    )
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().pruned == 1, what="the crashed one pruned")
        await wait_until(lambda: consumer.stats().acked == 3, what="its entries handled")
    assert sorted(handled) == sorted(ids)
    assert await consumer_names(redis_client, stream_name) == {"c1"}
    assert await pending_count(redis_client, stream_name) == 0
    assert consumer.stats().claimed == 3


async def test_a_live_quiet_consumer_loses_nothing_and_on_7_2_is_kept(
    redis_client: Client, stream_name: str
) -> None:
    await redis_client.xgroup_create(stream_name, "g", id="$", mkstream=True)
    info = await redis_client.info("server")
    compat = tuple(int(p) for p in str(info["redis_version"]).split(".")[:2])
    handled: dict[str, list[str]] = {"c1": [], "c2": []}

    def handler_of(name: str) -> Any:
        async def handler(msg: Message) -> None:
            handled[name].append(msg.id)

        return handler

    # Its reads are 0.05 s apart, so on Redis >= 7.2 (and Valkey), where "idle"
    # counts from the last read attempt, it is never idle for 0.3 s. Before 7.2
    # idle counts from the last read that returned entries: a quiet consumer looks
    # idle and is deleted, harmlessly (it holds nothing, and Redis recreates it
    # when it next delivers to it).
    quiet = make_consumer(redis_client, consumer="c2", read_timeout=0.05, concurrency=1)
    quiet.subscribe(stream_name, handler_of("c2"))
    pruning = make_consumer(
        redis_client, consumer="c1", read_timeout=0.05, prune_consumers_after=0.3, concurrency=1
    )
    pruning.subscribe(stream_name, handler_of("c1"))
    async with quiet:
        await wait_until(
            lambda: _has_consumer(redis_client, stream_name, "c2"), what="c2 in the group"
        )
        # Created after c2: when "gone" has idled long enough, c2 has been quiet longer.
        await redis_client.xgroup_createconsumer(stream_name, "g", "gone")
        async with pruning:
            await wait_until(lambda: pruning.stats().pruned >= 1, what="gone pruned")
            names = await consumer_names(redis_client, stream_name)
            assert "gone" not in names
            if compat >= (7, 2):
                assert names == {"c1", "c2"}
                assert pruning.stats().pruned == 1
            ids = await add(redis_client, stream_name, 200)
            await wait_until(
                lambda: quiet.stats().acked + pruning.stats().acked == 200, what="200 acks"
            )
    assert sorted(handled["c1"] + handled["c2"]) == sorted(ids)
    assert await pending_count(redis_client, stream_name) == 0


async def _has_consumer(client: Client, stream: str, name: str) -> bool:
    try:
        return name in await consumer_names(client, stream)
    except redis.ResponseError:  # the group is not there (yet)
        return False


async def test_a_missing_group_prunes_nothing_and_is_recreated(
    redis_client: Client, stream_name: str
) -> None:
    await redis_client.xgroup_create(stream_name, "g", id="$", mkstream=True)

    async def handler(msg: Message) -> None:
        pass

    consumer = make_consumer(redis_client, read_timeout=0.05, prune_consumers_after=0.3)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await redis_client.delete(stream_name)
        # The reader recreates stream and group; the pruner carries on meanwhile.
        await wait_until(
            lambda: _has_consumer(redis_client, stream_name, "c1"), what="group recreated"
        )
        await add(redis_client, stream_name, 1)
        await wait_until(lambda: consumer.stats().acked == 1, what="new entry handled")
        assert consumer.state.value == "running"
    assert consumer.stats().pruned == 0


@pytest.mark.parametrize(
    ("kw", "text"),
    [
        ({"prune_consumers_after": -1.0}, "prune_consumers_after"),
        ({"prune_consumers_after": 1.0, "read_timeout": 0}, "read_timeout must be > 0"),
        ({"prune_consumers_after": 2.0, "read_timeout": 2.0}, "must exceed read_timeout"),
    ],
)
def test_bad_prune_options_are_refused(kw: dict[str, float], text: str) -> None:
    with pytest.raises(ValueError, match=text):
        ConsumerOptions(redis="redis://127.0.0.1:1/0", group="g", consumer="c", **kw)
