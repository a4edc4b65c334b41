"""Safe trimming never deletes an entry some consumer group has not finished with.

``PublisherOptions(safe_trim=True, stream_max_length=N)`` trims with ``XTRIM MINID``
at the oldest entry any group still needs (unread, or read and pending), so a lagging
or stuck group lets the stream grow past N. Plain ``MAXLEN`` keeps the stream at N
and deletes whatever is oldest, read or not: the tests show both.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from faults.harness import pending_count, stream_ids, wait_until

from streamq import AsyncConsumer, AsyncPublisher, Backoff, Message, MessageLostError
from streamq._servers import LocalRedis
from streamq._transport import open_transport
from streamq._trim import safe_trim

pytestmark = [pytest.mark.anyio, pytest.mark.faults]


def _xlen(server: LocalRedis, stream: str) -> int:
    return int(server.execute("XLEN", stream))  # type: ignore[arg-type]


def _needed(server: LocalRedis, stream: str) -> set[str]:
    """Entries some group of ``stream`` has not read, or has read and not acked."""
    ids = stream_ids(server, stream)
    needed: set[str] = set()
    for row in server.execute("XINFO", "GROUPS", stream) or []:  # type: ignore[union-attr]
        info = dict(zip(row[::2], row[1::2], strict=True))  # type: ignore[index]
        last = _key(info["last-delivered-id"])
        needed |= {i for i in ids if _key(i) > last}
        rows = server.execute("XPENDING", stream, info["name"], "-", "+", 100000)
        needed |= {r[0] for r in rows or []}  # type: ignore[index,union-attr]
    return needed


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def test_plain_maxlen_deletes_unread_and_pending_entries(
    redis_server: LocalRedis, stream_name: str
) -> None:
    """The trade-off, shown: MAXLEN keeps the length and loses what the group needed."""
    redis_server.execute("XGROUP", "CREATE", stream_name, "g", "0", "MKSTREAM")
    async with AsyncPublisher(redis=redis_server.url, stream_max_length=5) as publisher:
        ids = [await publisher.publish(Message(stream_name, {"n": i})) for i in range(8)]
        # A consumer reads three and dies: they are pending when MAXLEN trims them.
        reply = redis_server.execute(
            "XREADGROUP", "GROUP", "g", "dead", "COUNT", 3, "STREAMS", stream_name, ">"
        )
        taken = [entry[0] for entry in reply[0][1]]  # type: ignore[index]
        ids += [await publisher.publish(Message(stream_name, {"n": i})) for i in range(8, 20)]
    assert _xlen(redis_server, stream_name) == 5
    lost: list[MessageLostError] = []
    handled: list[str] = []

    async def handler(msg: Message) -> None:
        handled.append(msg.id)

    consumer = AsyncConsumer(
        redis=redis_server.url,
        group="g",
        consumer="c1",
        pending_timeout=0.1,
        handler_timeout=0,
        claim_interval=0.05,
        read_timeout=0.2,
        backoff=Backoff(min=0.01, max=0.05),
    )
    consumer.subscribe(stream_name, handler)
    async with consumer:

        async def settled() -> bool:
            return len(handled) == 5 and pending_count(redis_server, stream_name) == 0

        await wait_until(settled, 10, "the survivors handled, the lost ones reported")
        while (err := consumer.errors().get_nowait()) is not None:
            if isinstance(err, MessageLostError):
                lost.append(err)
    # 12 entries the group never read are gone without a trace; the 3 pending
    # ones are at least reported.
    assert handled == ids[-5:]
    assert sorted(e.entry_id for e in lost) == taken


async def test_safe_trim_keeps_unread_and_pending_entries(
    redis_server: LocalRedis, stream_name: str
) -> None:
    redis_server.execute("XGROUP", "CREATE", stream_name, "slow", "0", "MKSTREAM")
    redis_server.execute("XGROUP", "CREATE", stream_name, "fast", "0")
    options = {"safe_trim": True, "stream_max_length": 10}
    async with AsyncPublisher(redis=redis_server.url, **options) as publisher:  # type: ignore[arg-type]
        ids = [await publisher.publish(Message(stream_name, {"n": i})) for i in range(50)]
        # "fast" reads and acks everything; "slow" has read 20 and acked 5.
        redis_server.execute("XREADGROUP", "GROUP", "fast", "f", "STREAMS", stream_name, ">")
        redis_server.execute("XACK", stream_name, "fast", *ids)
        redis_server.execute(
            "XREADGROUP", "GROUP", "slow", "s", "COUNT", 20, "STREAMS", stream_name, ">"
        )
        redis_server.execute("XACK", stream_name, "slow", *ids[:5])
        ids += [await publisher.publish(Message(stream_name, {"n": i})) for i in range(50, 100)]
    # aclose() waited for the last trim.
    assert publisher.stats().trims > 0
    remaining = set(stream_ids(redis_server, stream_name))
    # Everything from slow's oldest pending entry on is still there, nothing older.
    assert remaining == set(ids[5:])
    assert _xlen(redis_server, stream_name) > 10

    # Once every group has finished, the stream shrinks to the cap.
    redis_server.execute("XREADGROUP", "GROUP", "slow", "s", "STREAMS", stream_name, ">")
    redis_server.execute("XREADGROUP", "GROUP", "fast", "f", "STREAMS", stream_name, ">")
    redis_server.execute("XACK", stream_name, "slow", *ids)
    redis_server.execute("XACK", stream_name, "fast", *ids)
    async with AsyncPublisher(redis=redis_server.url, **options) as publisher:  # type: ignore[arg-type]
        for i in range(10):
            await publisher.publish(Message(stream_name, {"n": 100 + i}))
    assert _xlen(redis_server, stream_name) == 10


@pytest.mark.parametrize("approximate", [False, True])
async def test_safe_trim_never_deletes_what_a_group_needs_random_histories(
    redis_server: LocalRedis, stream_name: str, approximate: bool
) -> None:
    """Random publishes, reads and acks by three groups; a safe trim after each step."""
    rng = random.Random(11 + approximate)
    groups = ("a", "b", "c")
    for group in groups:
        redis_server.execute("XGROUP", "CREATE", stream_name, group, "0", "MKSTREAM")
    transport = open_transport(redis_server.url, 5.0)
    deleted = limited = 0
    try:
        for _ in range(150):
            op = rng.random()
            group = rng.choice(groups)
            if op < 0.5:
                for _ in range(rng.randint(1, 20)):
                    redis_server.execute("XADD", stream_name, "*", "v", "x")
            elif op < 0.8:
                redis_server.execute(
                    "XREADGROUP", "GROUP", group, "c", "COUNT", rng.randint(1, 15),
                    "STREAMS", stream_name, ">",
                )  # fmt: skip
            else:
                rows = redis_server.execute("XPENDING", stream_name, group, "-", "+", 100)
                pending = [r[0] for r in rows or []]  # type: ignore[index,union-attr]
                if pending:
                    acked = rng.sample(pending, rng.randint(1, len(pending)))
                    redis_server.execute("XACK", stream_name, group, *acked)
            needed = _needed(redis_server, stream_name)
            result = await safe_trim(transport, stream_name, 5, approximate=approximate)
            deleted += result.deleted
            limited += result.limited_by_groups
            left = set(stream_ids(redis_server, stream_name))
            assert needed <= left, f"trimmed away {sorted(needed - left)[:5]} ({result})"
            if not approximate and not result.limited_by_groups:
                assert len(left) <= max(5, len(needed))
    finally:
        await transport.aclose()
    # The history exercised both: trims that happened (whole 100-entry nodes only, with
    # ~, too big for this history) and trims that groups held back.
    assert deleted > 0 or approximate
    assert limited > 0


async def test_safe_trim_without_groups_trims_like_maxlen(
    redis_server: LocalRedis, stream_name: str
) -> None:
    async with AsyncPublisher(
        redis=redis_server.url, safe_trim=True, stream_max_length=7
    ) as publisher:
        ids = [await publisher.publish(Message(stream_name, {"n": i})) for i in range(30)]
    assert stream_ids(redis_server, stream_name) == ids[-7:]


async def test_consumers_and_safe_trimming_together_lose_nothing(
    redis_server: LocalRedis, stream_name: str
) -> None:
    """A live consumer group and a publisher trimming at 20 entries: every message handled."""
    handled: set[str] = set()

    async def handler(msg: Message) -> None:
        await asyncio.sleep(0.001)
        handled.add(msg.id)

    consumer = AsyncConsumer(
        redis=redis_server.url,
        group="g",
        consumer="c1",
        start_id="0",
        read_timeout=0.1,
        concurrency=2,
        buffer_size=5,
    )
    consumer.subscribe(stream_name, handler)
    redis_server.execute("XGROUP", "CREATE", stream_name, "g", "0", "MKSTREAM")
    async with (
        AsyncPublisher(redis=redis_server.url, safe_trim=True, stream_max_length=20) as publisher,
        consumer,
    ):
        ids = [await publisher.publish(Message(stream_name, {"n": i})) for i in range(500)]

        async def done() -> bool:
            return set(ids) <= handled and pending_count(redis_server, stream_name) == 0

        await wait_until(done, 20, "everything handled")
    assert consumer.stats().lost == 0
    assert publisher.stats().trimmed > 0
