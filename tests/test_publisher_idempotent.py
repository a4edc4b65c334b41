"""Idempotent publishing: a publish retried after a lost reply is stored once.

The proxy lets the XADD reach Redis and run, then resets the connection instead
of passing the reply on: the client cannot know whether the entry was stored.
Each test checks what the stream holds afterwards (XLEN, XRANGE), not only what
``publish`` returned.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio
from conftest import MakeProxy
from helpers import FAST, drain_errors

from streamq import AsyncPublisher, Message, NetworkError, PublisherOptions
from streamq._idempotence import FIELD, find_stored
from streamq._transport import open_transport

pytestmark = pytest.mark.anyio

Client = redis.asyncio.Redis


def publisher(url: str, **kw: Any) -> AsyncPublisher:
    kw.setdefault("backoff", FAST)
    kw.setdefault("network_retry", 5)
    return AsyncPublisher(PublisherOptions(redis=url, **kw))


async def stored(client: Client, stream: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (entry_id.decode(), {k.decode(): v.decode() for k, v in fields.items()})
        for entry_id, fields in await client.xrange(stream)
    ]


async def test_without_idempotence_a_lost_reply_stores_the_entry_twice(
    redis_client: Client, stream_name: str, make_proxy: MakeProxy
) -> None:
    # The fault is real: the default at-least-once publisher duplicates here.
    proxy = await make_proxy()
    async with publisher(proxy.url()) as pub:
        await pub.publish(Message(stream_name, {"n": 0}))  # connected
        proxy.lose_replies(1)
        entry_id = await pub.publish(Message(stream_name, {"n": 1}))
    assert proxy.replies_lost == 1
    rows = await stored(redis_client, stream_name)
    assert [f["n"] for _, f in rows] == ["0", "1", "1"]
    assert entry_id == rows[2][0]


async def test_a_publish_retried_after_a_lost_reply_is_stored_once(
    redis_client: Client, stream_name: str, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()
    async with publisher(proxy.url(), idempotent=True) as pub:
        first = await pub.publish(Message(stream_name, {"n": 0}))
        proxy.lose_replies(1)
        msg = Message(stream_name, {"n": 1})
        entry_id = await pub.publish(msg)
        errors = drain_errors(pub)
        stats = pub.stats()
    assert proxy.replies_lost == 1
    rows = await stored(redis_client, stream_name)
    assert [(i, f["n"]) for i, f in rows] == [(first, "0"), (entry_id, "1")]
    assert msg.id == entry_id
    # Each entry carries its own tag; the retry was reported, then resolved.
    assert rows[0][1][FIELD] != rows[1][1][FIELD]
    assert [type(e) for e in errors] == [NetworkError]
    assert errors[0].retrying
    assert (stats.published, stats.failed) == (2, 0)


async def test_publish_many_after_a_lost_reply_stores_every_entry_once(
    redis_client: Client, stream_name: str, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()
    other = f"{stream_name}:other"
    msgs = [Message(stream_name if i % 2 else other, {"n": i}) for i in range(2500)]
    async with publisher(proxy.url(), idempotent=True) as pub:
        await pub.publish(Message(stream_name, {"n": -1}))
        first_batch = await pub.publish_many(msgs[:1000])
        # The next batch of 1000 loses its reply; the one after it does not.
        proxy.lose_replies(1)
        rest = await pub.publish_many(msgs[1000:])
    ids = first_batch + rest
    assert proxy.replies_lost == 1
    main_rows = await stored(redis_client, stream_name)
    other_rows = await stored(redis_client, other)
    assert len(main_rows) == 1 + 1250
    assert len(other_rows) == 1250
    by_id = {(stream_name, i): int(f["n"]) for i, f in main_rows}
    by_id.update({(other, i): int(f["n"]) for i, f in other_rows})
    # Every returned ID is the stored entry of that very message.
    assert [by_id[m.stream, i] for m, i in zip(msgs, ids, strict=True)] == list(range(2500))
    assert await redis_client.xlen(stream_name) + await redis_client.xlen(other) == 2501


async def test_concurrent_publishes_after_a_lost_reply_are_stored_once(
    redis_client: Client, stream_name: str, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()
    async with publisher(proxy.url(), idempotent=True) as pub:
        await pub.publish(Message(stream_name, {"n": -1}))
        proxy.lose_replies(1)
        ids = await asyncio.gather(
            *(pub.publish(Message(stream_name, {"n": i})) for i in range(300))
        )
        assert pub.stats().published == 301
    assert proxy.replies_lost == 1
    rows = await stored(redis_client, stream_name)
    assert await redis_client.xlen(stream_name) == 301
    by_id = {i: int(f["n"]) for i, f in rows}
    assert [by_id[i] for i in ids] == list(range(300))


async def test_an_explicit_id_retried_after_a_lost_reply_is_not_refused(
    redis_client: Client, stream_name: str, make_proxy: MakeProxy
) -> None:
    # Resending an explicit ID that was stored would be refused ("equal or smaller
    # than the target stream top item"): the lookup finds it first.
    proxy = await make_proxy()
    async with publisher(proxy.url(), idempotent=True) as pub:
        await pub.publish(Message(stream_name, {"n": 0}, id="5-1"))
        proxy.lose_replies(1)
        entry_id = await pub.publish(Message(stream_name, {"n": 1}, id="7-1"))
    assert entry_id == "7-1"
    assert [(i, f["n"]) for i, f in await stored(redis_client, stream_name)] == [
        ("5-1", "0"),
        ("7-1", "1"),
    ]


async def test_a_message_passed_on_gets_a_tag_of_its_own(
    redis_client: Client, stream_name: str
) -> None:
    url = f"redis://{redis_client.get_connection_kwargs()['host']}:"
    url += f"{redis_client.get_connection_kwargs()['port']}/0"
    async with publisher(url, idempotent=True) as pub:
        await pub.publish(Message(stream_name, {"n": 0}))
        [(_, fields)] = await stored(redis_client, stream_name)
        # Forwarding a received message, tag and all, must not reuse the old tag.
        await pub.publish(Message(stream_name, dict(fields)))
    rows = await stored(redis_client, stream_name)
    assert len(rows) == 2
    assert rows[0][1][FIELD] != rows[1][1][FIELD]
    assert list(rows[1][1]) == ["n", FIELD]


async def test_idempotent_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="idempotent: expected a bool, got str"):
        PublisherOptions(redis="redis://127.0.0.1:1/0", idempotent="yes")  # type: ignore[arg-type]


async def _xrevrange_calls(client: Client) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_xrevrange", {}).get("calls", 0))


async def test_the_lookup_pages_back_through_newer_entries(
    redis_client: Client, stream_name: str
) -> None:
    lost = await redis_client.xadd(stream_name, {"n": 0, FIELD: "tag-lost"})
    pipe = redis_client.pipeline(transaction=False)
    for i in range(2500):  # published by others since
        pipe.xadd(stream_name, {"n": i + 1})
    await pipe.execute()
    transport = open_transport(redis_client, command_timeout=5.0)
    before = await _xrevrange_calls(redis_client)
    try:
        found = await find_stored(
            transport, [(stream_name, "*", "tag-lost"), (stream_name, "*", "tag-never")], 1.0
        )
    finally:
        await transport.aclose()
    assert found == {0: lost.decode()}
    # Three pages of 1000 reach the lost entry (then the stream begins).
    assert await _xrevrange_calls(redis_client) - before == 3


async def test_the_lookup_stops_at_entries_older_than_the_window(
    redis_client: Client, stream_name: str
) -> None:
    pipe = redis_client.pipeline(transaction=False)
    for i in range(1, 3001):  # an old backlog (IDs from 1970)
        pipe.xadd(stream_name, {"n": i, FIELD: f"old-{i}"}, id=f"1-{i}")
    await pipe.execute()
    await redis_client.xadd(stream_name, {"n": 0})
    transport = open_transport(redis_client, command_timeout=5.0)
    before = await _xrevrange_calls(redis_client)
    try:
        found = await find_stored(transport, [(stream_name, "*", "old-5")], 1.0)
    finally:
        await transport.aclose()
    assert found == {}
    assert await _xrevrange_calls(redis_client) - before == 1
