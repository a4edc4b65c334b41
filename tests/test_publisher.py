"""AsyncPublisher against a real Redis: XADD, batches, trimming, retries, errors, lifecycle."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import redis.asyncio
from conftest import MakeProxy
from helpers import FAST, drain_errors, wait_until

from streamq import (
    AsyncPublisher,
    ClosedError,
    Message,
    NetworkError,
    PublisherOptions,
    RedisError,
)
from streamq._servers import LocalRedis

pytestmark = pytest.mark.anyio


def publisher(client: Any, **kw: Any) -> AsyncPublisher:
    kw.setdefault("backoff", FAST)
    return AsyncPublisher(PublisherOptions(redis=client, **kw))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def entries(client: redis.asyncio.Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (_text(i), {_text(k): _text(v) for k, v in f.items()})
        for i, f in await client.xrange(stream)
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def client_names(client: redis.asyncio.Redis) -> list[str]:
    return [c.get("name", "") for c in await client.client_list()]


# -- publish ------------------------------------------------------------------------


async def test_publish_writes_the_id_back(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    async with publisher(redis_client) as pub:
        msg = Message(stream_name, {"a": "x", "b": b"\x00\xff", "n": 7, "f": 1.5})
        entry_id = await pub.publish(msg)
        assert msg.id == entry_id
        assert pub.stats().published == 1
    rows = await redis_client.xrange(stream_name)
    assert len(rows) == 1
    assert _text(rows[0][0]) == entry_id
    assert rows[0][1] == {b"a": b"x", b"b": b"\x00\xff", b"n": b"7", b"f": b"1.5"}


async def test_publish_explicit_id(
    redis_client: redis.asyncio.Redis, stream_name: str, server_version: tuple[int, ...]
) -> None:
    async with publisher(redis_client) as pub:
        assert await pub.publish(Message(stream_name, {"a": 1}, id="5-1")) == "5-1"
        # ``ms-*`` (Redis picks the sequence) came with Redis 7.0.
        next_id = "6-*" if server_version >= (7,) else "6-0"
        assert await pub.publish(Message(stream_name, {"a": 1}, id=next_id)) == "6-0"
        # An ID not above the stream's last is Redis' error, not a network one.
        with pytest.raises(RedisError) as info:
            await pub.publish(Message(stream_name, {"a": 1}, id="5-1"))
        assert not isinstance(info.value, NetworkError)
        assert pub.stats().failed == 1
    assert await redis_client.xlen(stream_name) == 2


async def test_publish_many_in_order(redis_client: redis.asyncio.Redis, stream_name: str) -> None:
    msgs = [Message(stream_name, {"n": i}) for i in range(2500)]
    async with publisher(redis_client) as pub:
        ids = await pub.publish_many(msgs)
        # One pipelined round trip per 1000 entries: 1000 + 1000 + 500.
        assert pub.stats().batches == 3
        assert pub.stats().published == 2500
        assert await pub.publish_many([]) == []
    assert [m.id for m in msgs] == ids
    stored = await entries(redis_client, stream_name)
    assert [i for i, _ in stored] == ids
    assert [f["n"] for _, f in stored] == [str(i) for i in range(2500)]


async def test_publish_many_across_streams(
    redis_client: redis.asyncio.Redis, key_prefix: str
) -> None:
    a, b = f"{key_prefix}a", f"{key_prefix}b"
    async with publisher(redis_client) as pub:
        ids = await pub.publish_many(
            [Message(a, {"x": 1}), Message(b, {"x": 2}), Message(a, {"x": 3})]
        )
    assert [i for i, _ in await entries(redis_client, a)] == [ids[0], ids[2]]
    assert [i for i, _ in await entries(redis_client, b)] == [ids[1]]


async def test_maxlen_exact(redis_client: redis.asyncio.Redis, stream_name: str) -> None:
    async with publisher(redis_client, stream_max_length=5) as pub:
        for i in range(12):
            await pub.publish(Message(stream_name, {"n": i}))
        await pub.publish_many([Message(stream_name, {"n": i}) for i in range(12, 20)])
    stored = await entries(redis_client, stream_name)
    assert [f["n"] for _, f in stored] == ["15", "16", "17", "18", "19"]


async def test_maxlen_approximate(redis_client: redis.asyncio.Redis, stream_name: str) -> None:
    # Approximate trimming removes whole macro nodes (stream-node-max-entries).
    await redis_client.config_set("stream-node-max-entries", 10)
    try:
        async with publisher(
            redis_client, stream_max_length=20, approximate_max_length=True
        ) as pub:
            await pub.publish_many([Message(stream_name, {"n": i}) for i in range(300)])
            await pub.publish(Message(stream_name, {"n": 300}))
    finally:
        await redis_client.config_set("stream-node-max-entries", 100)
    length = await redis_client.xlen(stream_name)
    # Never below the cap, trimmed well below what was written, newest kept.
    assert 20 <= length < 300
    stored = await entries(redis_client, stream_name)
    assert stored[-1][1]["n"] == "300"


async def test_no_maxlen_keeps_everything(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    async with publisher(redis_client) as pub:
        await pub.publish_many([Message(stream_name, {"n": i}) for i in range(50)])
    assert await redis_client.xlen(stream_name) == 50


async def test_concurrent_publishes_are_coalesced(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    msgs = [Message(stream_name, {"n": i}) for i in range(300)]
    async with publisher(redis_client) as pub:
        ids = await asyncio.gather(*(pub.publish(m) for m in msgs))
        assert pub.stats().batches > 0
        assert pub.stats().published == 300
    # Every caller got its own entry's ID.
    assert [m.id for m in msgs] == ids
    assert len(set(ids)) == 300
    by_id = dict(await entries(redis_client, stream_name))
    assert {i: f["n"] for i, f in by_id.items()} == {m.id: str(m.values["n"]) for m in msgs}


# -- rejected input ---------------------------------------------------------------


async def test_rejected_input_sends_nothing(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    async with publisher(redis_client) as pub:
        bad_value = Message(stream_name, {"a": 1})
        bad_value.values["b"] = None  # type: ignore[assignment]
        with pytest.raises(TypeError, match="values"):
            await pub.publish(bad_value)
        empty = Message(stream_name, {"a": 1})
        empty.values.clear()
        with pytest.raises(ValueError, match="values"):
            await pub.publish(empty)
        no_stream = Message(stream_name, {"a": 1})
        no_stream.stream = ""
        with pytest.raises(ValueError, match="stream"):
            await pub.publish(no_stream)
        with pytest.raises(TypeError, match="Message"):
            await pub.publish({"a": 1})  # type: ignore[arg-type]
        # One bad message in a batch: nothing of the batch is sent.
        good = [Message(stream_name, {"n": i}) for i in range(5)]
        with pytest.raises(TypeError):
            await pub.publish_many([*good, bad_value])
        assert all(m.id == "*" for m in good)
        assert pub.stats().published == 0
    assert await redis_client.exists(stream_name) == 0


async def test_wrongtype_is_a_redis_error(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    await redis_client.set(stream_name, "a string")
    async with publisher(redis_client) as pub:
        msg = Message(stream_name, {"a": 1})
        with pytest.raises(RedisError, match="WRONGTYPE") as info:
            await pub.publish(msg)
        assert info.value.message is msg
        assert info.value.__cause__ is not None
        assert msg.id == "*"
        with pytest.raises(RedisError, match="WRONGTYPE"):
            await pub.publish_many([Message(stream_name, {"a": 1})] * 3)
        # Not retried: a RedisError is not a network error.
        assert not any(isinstance(e, NetworkError) for e in drain_errors(pub))
    assert await redis_client.get(stream_name) == b"a string"


# -- network retries -------------------------------------------------------------


async def test_network_retries_then_raise(stream_name: str) -> None:
    pub = publisher(f"redis://127.0.0.1:{free_port()}/0", network_retry=3)
    msg = Message(stream_name, {"a": 1})
    with pytest.raises(NetworkError) as info:
        await pub.publish(msg)
    err = info.value
    assert (err.retrying, err.backoff, err.message) == (False, None, msg)
    assert err.__cause__ is not None
    assert err.error is err.__cause__
    reported = drain_errors(pub)
    # Each retry reported with its wait, following the backoff policy.
    assert [type(e) for e in reported] == [NetworkError] * 3
    assert all(isinstance(e, NetworkError) and e.retrying for e in reported)
    assert [e.backoff for e in reported] == [FAST.for_attempt(n) for n in range(3)]  # type: ignore[attr-defined]
    assert all(e.message is msg for e in reported)
    assert pub.stats().failed == 1
    await pub.aclose()


async def test_network_retry_zero_never_retries(stream_name: str) -> None:
    pub = publisher(f"redis://127.0.0.1:{free_port()}/0", network_retry=0)
    with pytest.raises(NetworkError) as info:
        await pub.publish(Message(stream_name, {"a": 1}))
    assert info.value.retrying is False
    assert drain_errors(pub) == []
    with pytest.raises(NetworkError):
        await pub.publish_many([Message(stream_name, {"a": 1})])
    assert drain_errors(pub) == []
    await pub.aclose()


async def test_retries_are_not_multiplied(stream_name: str, make_proxy: MakeProxy) -> None:
    # redis-py would retry by itself (10 times by default); streamq's layer is the only one.
    proxy = await make_proxy()
    proxy.refuse()
    pub = publisher(proxy.url(), network_retry=2)
    with pytest.raises(NetworkError):
        await pub.publish(Message(stream_name, {"a": 1}))
    assert proxy.connections_accepted == 3  # one attempt plus two retries
    await pub.aclose()


async def test_network_retry_forever_until_redis_is_back(
    redis_client: redis.asyncio.Redis, stream_name: str, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()
    proxy.refuse()
    pub = publisher(proxy.url(), network_retry=-1)
    task = asyncio.create_task(pub.publish(Message(stream_name, {"a": 1})))
    # More retries than any finite default would allow with this backoff.
    await wait_until(lambda: pub.stats().errors_reported >= 25, what="25 retries")
    assert not task.done()
    proxy.refuse(False)
    entry_id = await asyncio.wait_for(task, 10)
    assert [i for i, _ in await entries(redis_client, stream_name)] == [entry_id]
    errors = drain_errors(pub)
    assert all(isinstance(e, NetworkError) and e.retrying for e in errors)
    await pub.aclose()


async def test_retry_after_a_cut_connection(
    redis_client: redis.asyncio.Redis, stream_name: str, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()
    async with publisher(proxy.url(), network_retry=5) as pub:
        await pub.publish(Message(stream_name, {"n": 0}))
        proxy.cut()
        await pub.publish(Message(stream_name, {"n": 1}))
        await pub.publish_many([Message(stream_name, {"n": 2})])
    assert [f["n"] for _, f in await entries(redis_client, stream_name)] == ["0", "1", "2"]


async def test_concurrent_publishes_fail_together(stream_name: str) -> None:
    pub = publisher(f"redis://127.0.0.1:{free_port()}/0", network_retry=1)
    results = await asyncio.gather(
        *(pub.publish(Message(stream_name, {"n": i})) for i in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, NetworkError) and not r.retrying for r in results)
    assert pub.stats().failed == 20
    await pub.aclose()


async def test_coalesced_publishes_refused_during_a_failover_are_retried(
    make_server: Any, stream_name: str
) -> None:
    # A master demoted to a replica answers READONLY to each XADD of a pipeline:
    # those did not run, so they are sent again until it takes writes again.
    server = make_server()
    server.execute("REPLICAOF", "127.0.0.1", free_port())
    async with publisher(server.url, network_retry=-1) as pub:
        tasks = [
            asyncio.ensure_future(pub.publish(Message(stream_name, {"n": i}))) for i in range(50)
        ]
        await wait_until(lambda: pub.stats().errors_reported >= 4, what="retries")
        assert not any(task.done() for task in tasks)
        server.execute("REPLICAOF", "NO", "ONE")
        ids = await asyncio.gather(*tasks)
        assert pub.stats().batches > 0
    client = server.client()
    try:
        assert sorted(i for i, _ in await entries(client, stream_name)) == sorted(ids)
    finally:
        await client.aclose()


# -- safe trimming ------------------------------------------------------------------


async def test_safe_trim_keeps_what_groups_need(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    async with publisher(redis_client) as pub:
        ids = await pub.publish_many([Message(stream_name, {"n": i}) for i in range(30)])
    # Group "slow" read 10 entries and acked 5; group "done" read and acked all.
    await redis_client.xgroup_create(stream_name, "slow", id="0")
    await redis_client.xgroup_create(stream_name, "done", id="0")
    read = await redis_client.xreadgroup("slow", "c", {stream_name: ">"}, count=10)
    await redis_client.xack(stream_name, "slow", *[i for i, _ in read[0][1][:5]])
    all_read = await redis_client.xreadgroup("done", "c", {stream_name: ">"})
    await redis_client.xack(stream_name, "done", *[i for i, _ in all_read[0][1]])

    async with publisher(redis_client, stream_max_length=3, safe_trim=True) as pub:
        await pub.publish(Message(stream_name, {"n": 30}))
        await pub.aclose()  # waits for the background trim
        assert pub.stats().trims >= 1
        assert pub.stats().trimmed == 5

    stored = [i for i, _ in await entries(redis_client, stream_name)]
    # Everything from the oldest entry "slow" has not acked is still there.
    assert stored[0] == ids[5]
    assert len(stored) == 26
    pel = await redis_client.xpending(stream_name, "slow")
    assert pel["pending"] == 5
    assert _text(pel["min"]) == ids[5]
    # Every pending entry is still readable.
    for row in await redis_client.xpending_range(stream_name, "slow", "-", "+", 100):
        assert await redis_client.xrange(stream_name, row["message_id"], row["message_id"])


async def test_safe_trim_with_unread_entries(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    async with publisher(redis_client) as pub:
        ids = await pub.publish_many([Message(stream_name, {"n": i}) for i in range(20)])
    # A group that has read nothing (at "0"): nothing may be trimmed.
    await redis_client.xgroup_create(stream_name, "new", id="0")
    async with publisher(redis_client, stream_max_length=2, safe_trim=True) as pub:
        await pub.publish(Message(stream_name, {"n": 20}))
    assert await redis_client.xlen(stream_name) == 21
    # Once the group has consumed and acked everything, the cap applies.
    got = await redis_client.xreadgroup("new", "c", {stream_name: ">"})
    await redis_client.xack(stream_name, "new", *[i for i, _ in got[0][1]])
    async with publisher(redis_client, stream_max_length=2, safe_trim=True) as pub:
        await pub.publish(Message(stream_name, {"n": 21}))
    info = await redis_client.xinfo_stream(stream_name)
    assert info["length"] == 2
    assert ids[0] not in [i for i, _ in await entries(redis_client, stream_name)]


async def test_safe_trim_without_groups_caps(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    async with publisher(redis_client, stream_max_length=4, safe_trim=True) as pub:
        for i in range(10):
            await pub.publish(Message(stream_name, {"n": i}))
    assert await redis_client.xlen(stream_name) == 4


# -- lifecycle ----------------------------------------------------------------------


async def test_aclose_idempotent_and_closed_error(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    pub = publisher(redis_client)
    await pub.publish(Message(stream_name, {"a": 1}))
    await pub.aclose()
    await pub.aclose()
    with pytest.raises(ClosedError):
        await pub.publish(Message(stream_name, {"a": 2}))
    with pytest.raises(ClosedError):
        await pub.publish_many([Message(stream_name, {"a": 2})])
    with pytest.raises(ClosedError):
        async with pub:
            pass
    # errors() ends once closed.
    assert [e async for e in pub.errors()] == []
    assert await redis_client.xlen(stream_name) == 1


async def test_borrowed_client_is_not_closed(redis_server: LocalRedis, stream_name: str) -> None:
    client = redis_server.client(client_name="borrowed-client")
    try:
        await client.ping()
        async with publisher(client) as pub:
            await pub.publish(Message(stream_name, {"a": 1}))
        # The user's connection is still open and still works.
        assert "borrowed-client" in await client_names(client)
        assert await client.xlen(stream_name) == 1
    finally:
        await client.delete(stream_name)
        await client.aclose()


async def test_url_built_client_is_closed(
    redis_server: LocalRedis, redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    url = f"{redis_server.url}?client_name=owned-by-streamq"
    pub = publisher(url)
    await asyncio.gather(*(pub.publish(Message(stream_name, {"n": i})) for i in range(20)))
    assert "owned-by-streamq" in await client_names(redis_client)
    await pub.aclose()
    # No connection of streamq's is left open.
    await wait_until(
        lambda: _absent(redis_client, "owned-by-streamq"), timeout=5, what="connections closed"
    )


async def _absent(client: redis.asyncio.Redis, name: str) -> bool:
    return name not in await client_names(client)


async def test_errors_iterator_ends_on_close(stream_name: str) -> None:
    pub = publisher(f"redis://127.0.0.1:{free_port()}/0", network_retry=2)
    seen: list[Any] = []

    async def read() -> None:
        async for err in pub.errors():
            seen.append(err)

    reader = asyncio.create_task(read())
    with pytest.raises(NetworkError):
        await pub.publish(Message(stream_name, {"a": 1}))
    await pub.aclose()
    await asyncio.wait_for(reader, 5)
    assert len(seen) == 2
    assert all(e.retrying for e in seen)
