"""PartitionedStream naming and routing, key lanes, and per-key ordering on a single Redis."""

from __future__ import annotations

import asyncio
import random
import zlib
from collections import defaultdict
from typing import Any

import pytest
import redis.asyncio
from helpers import make_consumer, pending_count, wait_until
from redis.crc import key_slot

from streamq import AsyncPublisher, Message, PartitionedStream, fail
from streamq._ordering import KeyLanes
from streamq._partition import KEY_FIELD, slot_tag

pytestmark = pytest.mark.anyio

Client = redis.asyncio.Redis


def test_keys_are_stable_and_spread_over_the_slots() -> None:
    orders = PartitionedStream("orders", partitions=4)
    assert orders.keys == PartitionedStream("orders", partitions=4).keys
    assert [key.split(":")[1] for key in orders.keys] == ["p0", "p1", "p2", "p3"]
    slots = [key_slot(key.encode()) for key in orders.keys]
    # Partition i sits in the i-th quarter of the slots, clear of its edges.
    for i, slot in enumerate(slots):
        assert 4096 * i + 400 <= slot < 4096 * (i + 1) - 400
    # Another stream uses other slots.
    assert set(slots).isdisjoint(
        key_slot(k.encode()) for k in PartitionedStream("payments", 4).keys
    )
    assert PartitionedStream("solo", partitions=1).keys == ("solo",)
    for slot in (0, 1, 5461, 16383):
        assert key_slot(f"x{{{slot_tag(slot)}}}".encode()) == slot


def test_the_same_key_always_picks_the_same_partition() -> None:
    orders = PartitionedStream("orders", partitions=8)
    assert orders.partition_of("user-42") == zlib.crc32(b"user-42") % 8
    assert orders.partition_of(b"user-42") == orders.partition_of("user-42")
    assert orders.partition_of(42) == orders.partition_of("42")
    msg = orders.message({"total": "9.90"}, key="user-42")
    assert msg.stream == orders.keys[orders.partition_of("user-42")]
    assert msg.values == {"total": "9.90", KEY_FIELD: "user-42"}
    # A key already in the values is used as is.
    again = orders.message({KEY_FIELD: "user-42", "total": "1"})
    assert again.stream == msg.stream
    # No key: round-robin over every partition.
    streams = {orders.message({"n": i}).stream for i in range(8)}
    assert streams == set(orders.keys)


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        (("", 2), {}, ValueError),
        (("a{b}", 2), {}, ValueError),
        (("a", 0), {}, ValueError),
        (("a", True), {}, TypeError),
        (("a", 2.0), {}, TypeError),
        (("a", 2), {"key_field": ""}, ValueError),
    ],
)
def test_invalid_partitioned_streams_are_refused(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        PartitionedStream(*args, **kwargs)
    with pytest.raises(TypeError):
        PartitionedStream("a", 2).message({"x": 1}, key=1.5)  # type: ignore[arg-type]


def test_key_lanes_park_and_release_in_stream_order() -> None:
    lanes = KeyLanes()
    lanes.fields["s"] = KEY_FIELD

    def msg(entry_id: str, key: bytes | None) -> Message:
        values: dict[str, Any] = {"x": b"1"} if key is None else {KEY_FIELD: key}
        return Message._received("s", entry_id, values, 1)

    a1, a2, a3, b1, none = (
        msg("1-0", b"a"),
        msg("3-0", b"a"),
        msg("2-0", b"a"),
        msg("1-1", b"b"),
        msg("1-2", None),
    )
    assert lanes.admit(a1)
    assert not lanes.admit(a2)
    assert not lanes.admit(a3)  # older than a2: goes before it
    assert lanes.admit(b1)
    assert lanes.admit(none)
    assert lanes.parked == 2
    assert lanes.done(a1) is a3
    assert lanes.done(a3) is a2
    assert lanes.done(a2) is None
    assert lanes.done(b1) is None
    assert lanes.done(none) is None
    assert lanes.parked == 0
    other = Message._received("t", "1-0", {KEY_FIELD: b"a"}, 1)
    assert lanes.admit(other)  # streams without ordering are never parked


async def test_subscribe_a_partitioned_stream(redis_client: Client, key_prefix: str) -> None:
    orders = PartitionedStream(f"{key_prefix}orders", partitions=3)

    async def handler(msg: Message) -> None:
        return None

    consumer = make_consumer(redis_client)
    consumer.subscribe(orders, handler, ordered_by_key=True)
    assert consumer.streams == list(orders.keys)
    with pytest.raises(ValueError, match="already subscribed"):
        consumer.subscribe(orders, handler)
    await consumer.aclose()


async def test_per_key_order_on_a_single_redis(redis_client: Client, key_prefix: str) -> None:
    await check_per_key_order(redis_client, key_prefix, partitions=4)


async def test_a_failing_message_holds_back_its_key_until_dead_lettered(
    redis_client: Client, stream_name: str
) -> None:
    async with AsyncPublisher(redis=redis_client) as publisher:
        for key, n in (("a", 0), ("a", 1), ("b", 0), ("a", 2)):
            await publisher.publish(Message(stream_name, {KEY_FIELD: key, "n": n}))
    order: list[tuple[str, int]] = []

    async def handler(msg: Message) -> Any:
        item = (msg.text(KEY_FIELD), int(msg.values["n"]))
        order.append(item)
        if item == ("a", 0):
            return fail("poison", backoff=0.02)
        return None

    consumer = make_consumer(redis_client, start_id="0", max_retry=2, concurrency=4)
    consumer.subscribe(stream_name, handler, ordered_by_key=True)
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 4, what="four acks")

        async def nothing_pending() -> bool:
            return await pending_count(redis_client, stream_name) == 0

        await wait_until(nothing_pending, what="empty PEL")
    a_items = [item for item in order if item[0] == "a"]
    # Three deliveries of the poison message, then the rest of its key in order.
    assert a_items == [("a", 0), ("a", 0), ("a", 0), ("a", 1), ("a", 2)]
    # "b" did not wait for "a": it ran before the poison message was dead-lettered.
    assert order.index(("b", 0)) < order.index(("a", 1))
    assert consumer.stats().dead_lettered == 1
    assert await redis_client.xlen(f"{stream_name}:dead") == 1


async def check_per_key_order(client: Any, prefix: str, *, partitions: int) -> None:
    """Publish 600 messages over 24 keys; handle them with failures and random delays."""
    orders = PartitionedStream(f"{prefix}orders", partitions=partitions)
    rng = random.Random(5)
    keys = [f"user-{k}" for k in range(24)]
    sequence: dict[str, int] = defaultdict(int)
    messages = []
    for _ in range(600):
        key = rng.choice(keys)
        messages.append(orders.message({"seq": sequence[key]}, key=key))
        sequence[key] += 1
    async with AsyncPublisher(redis=client) as publisher:
        await publisher.publish_many(messages)
    handled: dict[str, list[int]] = defaultdict(list)
    running: set[str] = set()
    overlap = 0
    attempts: dict[str, int] = defaultdict(int)

    async def handler(msg: Message) -> Any:
        nonlocal overlap
        key = orders.key_of(msg)
        assert key is not None
        assert key not in running, f"two messages of {key} at once"
        running.add(key)
        overlap = max(overlap, len(running))
        try:
            await asyncio.sleep(rng.random() * 0.002)
            attempts[msg.id] += 1
            if attempts[msg.id] == 1 and rng.random() < 0.05:
                return fail("transient", backoff=0.005)  # later ones of the key must wait
            handled[key].append(int(msg.values["seq"]))
            return None
        finally:
            running.discard(key)

    consumer = make_consumer(client, start_id="0", concurrency=8, buffer_size=40)
    consumer.subscribe(orders, handler, ordered_by_key=True)
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 600, timeout=30, what="600 acks")
    for key in keys:
        assert handled[key] == list(range(sequence[key])), key
    assert overlap > 1  # different keys did run concurrently
    assert consumer.stats().retried > 0
    assert consumer._holding.lanes.parked == 0
    for stream in orders.keys:
        assert int((await client.xpending(stream, "g"))["pending"]) == 0


async def test_ordered_partitions_are_shared_out_and_handed_over(
    redis_client: Client, key_prefix: str
) -> None:
    await check_handover(redis_client, key_prefix)


async def check_handover(redis_client: Any, key_prefix: str) -> None:
    """Two consumers share 4 ordered partitions, then one leaves; per-key order holds."""
    orders = PartitionedStream(f"{key_prefix}orders", partitions=4)
    running: set[str] = set()
    handled: dict[str, list[int]] = defaultdict(list)
    sequence: dict[str, int] = defaultdict(int)
    rng = random.Random(7)

    async def handler(msg: Message) -> None:
        key = msg.text(KEY_FIELD)
        assert key not in running, f"two consumers ran messages of {key} at once"
        running.add(key)
        try:
            await asyncio.sleep(rng.random() * 0.003)
            handled[key].append(int(msg.values["seq"]))
        finally:
            running.discard(key)

    async def publish(publisher: AsyncPublisher, n: int) -> None:
        for _ in range(n):
            key = f"user-{rng.randrange(12)}"
            await publisher.publish(orders.message({"seq": sequence[key]}, key=key))
            sequence[key] += 1

    fast = {"pending_timeout": 1.5, "handler_timeout": 1.0, "claim_interval": 0.2}
    c1 = make_consumer(redis_client, consumer="c1", concurrency=4, **fast)
    c2 = make_consumer(redis_client, consumer="c2", concurrency=4, **fast)
    c1.subscribe(orders, handler, ordered_by_key=True)
    c2.subscribe(orders, handler, ordered_by_key=True)
    async with AsyncPublisher(redis=redis_client) as publisher, c1:
        await wait_until(lambda: c1._shared.leases.owned == set(orders.keys), what="c1 owns all")
        await publish(publisher, 100)
        async with c2:
            await publish(publisher, 100)
            await wait_until(
                lambda: len(c1._shared.leases.owned) == len(c2._shared.leases.owned) == 2,
                what="two partitions each",
            )
            assert c1._shared.leases.owned.isdisjoint(c2._shared.leases.owned)
            await publish(publisher, 100)
        # c2 left cleanly: its partitions come back to c1 at once (no lease expiry).
        await wait_until(
            lambda: c1._shared.leases.owned == set(orders.keys), what="c1 owns all again"
        )
        await publish(publisher, 100)
        await wait_until(lambda: sum(map(len, handled.values())) == 400, what="400 handled")
    for key, seqs in handled.items():
        assert seqs == list(range(sequence[key])), key
    assert c2.stats().handled > 0
    for stream in orders.keys:
        assert await pending_count(redis_client, stream) == 0
        assert await redis_client.exists(f"{stream}:lease:g") == 0
    assert await redis_client.exists(f"{orders.name}:members:g") == 0


async def test_a_dead_owner_s_partition_is_taken_over_in_order(
    redis_client: Client, key_prefix: str
) -> None:
    solo = PartitionedStream(f"{key_prefix}solo", partitions=1)
    stream = solo.keys[0]
    await redis_client.xgroup_create(stream, "g", id="0", mkstream=True)
    async with AsyncPublisher(redis=redis_client) as publisher:
        for n in range(6):
            await publisher.publish(solo.message({"seq": n}, key="k"))
    # "dead" read the first four, holds the lease for a moment longer, and died.
    await redis_client.xreadgroup("g", "dead", {stream: ">"}, count=4)
    await redis_client.set(f"{stream}:lease:g", "dead", px=600)
    seen: list[int] = []

    async def handler(msg: Message) -> None:
        seen.append(int(msg.values["seq"]))

    fast = {"pending_timeout": 0.9, "handler_timeout": 0.5, "claim_interval": 0.1}
    consumer = make_consumer(redis_client, consumer="c1", concurrency=4, **fast)
    consumer.subscribe(solo, handler, ordered_by_key=True)
    async with consumer:
        # Nothing is read while the dead owner's lease lasts...
        await asyncio.sleep(0.3)
        assert seen == []
        # ...then its entries come first, in order, before the unread ones.
        await wait_until(lambda: len(seen) == 6, timeout=5, what="six handled")
    assert seen == list(range(6))
    assert consumer.stats().claimed == 4
    assert await pending_count(redis_client, stream) == 0
