"""streamq on a real 3-master Redis Cluster: routing, the whole consumer core, partitions.

Every test here shares the session's cluster (``cluster`` fixture, no replicas) and
uses its own keys. Failover is in ``test_cluster_failover.py``.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from helpers import FAST, drain_errors, make_consumer, wait_until
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from test_partitions import check_handover, check_per_key_order

from streamq import (
    AsyncPublisher,
    DeadLetteredError,
    GroupRecreatedError,
    Message,
    NetworkError,
    PartitionedStream,
    fail,
)
from streamq._cluster import ClusterTransport, command_keys
from streamq._partition import slot_tag
from streamq._servers import LocalCluster

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]


@pytest.fixture
async def cluster_client(cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    """A redis-py cluster client, used by the tests to look at what Redis holds."""
    client = cluster.client()
    try:
        yield client
    finally:
        await client.aclose()


def master_port_of(cluster: LocalCluster, key: str) -> int:
    slot = key_slot(key.encode())
    for first, last, port in cluster.slot_ranges():
        if first <= slot <= last:
            return port
    raise AssertionError(f"slot {slot} is not served")


async def pending_of(client: RedisCluster, stream: str, group: str = "g") -> int:
    return int((await client.xpending(stream, group))["pending"])


def spread_streams(prefix: str) -> list[str]:
    """Three plain streams, one per master (hash tags in each third of the slots)."""
    return [
        f"{prefix}{name}{{{slot_tag(slot)}}}"
        for name, slot in (("a", 100), ("b", 6000), ("c", 12000))
    ]


async def test_partitions_land_on_different_masters(cluster: LocalCluster, key_prefix: str) -> None:
    masters = {node.port for node in cluster.masters()}
    assert len(masters) == 3
    for name in ("orders", "payments", f"{key_prefix}x"):
        three = PartitionedStream(name, partitions=3)
        assert {master_port_of(cluster, key) for key in three.keys} == masters
        six = PartitionedStream(name, partitions=6)
        per_master = defaultdict(int)
        for key in six.keys:
            per_master[master_port_of(cluster, key)] += 1
        assert sorted(per_master.values()) == [2, 2, 2]


async def test_publish_and_consume_across_masters(
    cluster: LocalCluster, cluster_client: RedisCluster, key_prefix: str
) -> None:
    plain = spread_streams(key_prefix)
    orders = PartitionedStream(f"{key_prefix}orders", partitions=3)
    async with AsyncPublisher(redis=cluster_client, backoff=FAST) as publisher:
        # One publish, a coalesced burst and a pipelined batch, each spanning masters.
        single = Message(plain[0], {"n": 0})
        burst = [Message(plain[i % 3], {"n": i}) for i in range(300)]
        batch = [orders.message({"n": i}, key=f"user-{i % 17}") for i in range(600)]
        await publisher.publish(single)
        await asyncio.gather(*(publisher.publish(msg) for msg in burst))
        await publisher.publish_many(batch)
        assert publisher.stats().batches >= 2
    # IDs are per stream: entries of different streams may share one.
    expected = {(msg.stream, msg.id) for msg in (single, *burst, *batch)}
    assert len(expected) == 901
    seen: list[tuple[str, str]] = []

    async def handler(msg: Message) -> None:
        seen.append((msg.stream, msg.id))

    consumer = make_consumer(cluster_client, start_id="0", buffer_size=20, concurrency=8)
    for stream in plain:
        consumer.subscribe(stream, handler)
    consumer.subscribe(orders, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 901, what="901 acks")
    errors = drain_errors(consumer)
    assert errors == [], errors  # in particular no CROSSSLOT
    assert sorted(seen) == sorted(expected)
    for stream in (*plain, *orders.keys):
        assert await pending_of(cluster_client, stream) == 0
    assert sum([await cluster_client.xlen(s) for s in orders.keys]) == 600


async def test_cluster_url_and_crossslot_refused_locally(
    cluster: LocalCluster, key_prefix: str
) -> None:
    a, b, _ = spread_streams(key_prefix)
    url = cluster.url.replace("redis://", "redis+cluster://")
    async with AsyncPublisher(redis=url) as publisher:
        await publisher.publish(Message(a, {"x": 1}))
        await publisher.publish(Message(b, {"x": 2}))
        transport = publisher._transport
        assert isinstance(transport, ClusterTransport)
        # Same hash tag, same slot: one command may read both.
        assert transport.slot_groups([a, b, a + "x"]) == [[a, a + "x"], [b]]
        with pytest.raises(redis.exceptions.ClusterCrossSlotError):
            await transport.execute("XREAD", "STREAMS", a, b, "0", "0")
    assert command_keys(("XGROUP", "CREATE", "s", "g", "$")) == ("s",)
    assert list(command_keys(["XREADGROUP", "GROUP", "g", "c", "STREAMS", "x", "y", ">", ">"])) == [
        "x",
        "y",
    ]
    assert command_keys(("INFO", "server")) == ()


async def test_retries_dead_letters_and_group_recreation(
    cluster: LocalCluster, cluster_client: RedisCluster, key_prefix: str
) -> None:
    plain = spread_streams(key_prefix)
    for i, stream in enumerate(plain):
        await cluster_client.xadd(stream, {"n": i, "kind": "poison" if i == 1 else "ok"})
    handled: dict[str, int] = defaultdict(int)

    async def handler(msg: Message) -> Any:
        handled[msg.stream] += 1
        if msg.values["kind"] == b"poison":
            return fail("never works", backoff=0.01)
        if handled[msg.stream] == 1:
            return fail("works the second time", backoff=0.01)
        return None

    consumer = make_consumer(cluster_client, start_id="0", max_retry=2)
    for stream in plain:
        consumer.subscribe(stream, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().dead_lettered == 1, what="a dead letter")
        await wait_until(lambda: consumer.stats().acked == 3, what="three acks")
        # The group vanishes from one master: the reader recreates it and goes on.
        await cluster_client.xgroup_destroy(plain[2], "g")
        await cluster_client.xadd(plain[2], {"n": 9, "kind": "ok"})
        await wait_until(lambda: handled[plain[2]] >= 3, what="reading after NOGROUP")
    errors = drain_errors(consumer)
    assert any(isinstance(e, GroupRecreatedError) for e in errors)
    dead = [e for e in errors if isinstance(e, DeadLetteredError)]
    assert [e.dead_letter_stream for e in dead] == [f"{plain[1]}:dead"]
    assert handled[plain[1]] == 3  # max_retry=2: three deliveries
    assert consumer.stats().retried >= 4
    entries = await cluster_client.xrange(f"{plain[1]}:dead")
    assert len(entries) == 1
    assert entries[0][1][b"streamq-original-stream"] == plain[1].encode()
    for stream in plain:
        assert await pending_of(cluster_client, stream) == 0


async def test_claiming_recovery_and_renewal(
    cluster: LocalCluster, cluster_client: RedisCluster, key_prefix: str
) -> None:
    plain = spread_streams(key_prefix)
    for stream in plain:
        await cluster_client.xgroup_create(stream, "g", id="0", mkstream=True)
        for i in range(3):
            await cluster_client.xadd(stream, {"n": i})
        # "dead" read everything and died; "c1" is about to restart.
        await cluster_client.xreadgroup("g", "dead", {stream: ">"}, count=2)
        await cluster_client.xreadgroup("g", "c1", {stream: ">"}, count=1)
    seen: dict[str, list[str]] = defaultdict(list)

    async def handler(msg: Message) -> None:
        seen[msg.stream].append(msg.id)

    options: dict[str, Any] = {"pending_timeout": 0.3, "claim_interval": 0.1}
    options["handler_timeout"] = 0.3
    # Once its entries are claimed, "dead" is pruned on every master.
    options |= {"read_timeout": 0.1, "prune_consumers_after": 0.5}
    consumer = make_consumer(cluster_client, "g", "c1", **options)
    for stream in plain:
        consumer.subscribe(stream, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 9, what="nine acks")
        await wait_until(lambda: consumer.stats().pruned == 3, what="dead pruned thrice")
    stats = consumer.stats()
    assert (stats.recovered, stats.claimed) == (3, 6)
    for stream in plain:
        assert len(seen[stream]) == 3
        assert await pending_of(cluster_client, stream) == 0
        consumers = await cluster_client.xinfo_consumers(stream, "g")
        assert [row["name"] for row in consumers] in (["c1"], [b"c1"])

    # Renewal: messages waiting in c2's buffer longer than pending_timeout are not
    # claimed by c3, because c2 renews them on every master.
    slow = spread_streams(key_prefix + "slow")
    for stream in slow:
        await cluster_client.xgroup_create(stream, "g", id="0", mkstream=True)
        for i in range(2):
            await cluster_client.xadd(stream, {"n": i})
    busy: list[tuple[str, str]] = []

    async def slow_handler(msg: Message) -> None:
        busy.append((msg.stream, msg.id))
        await asyncio.sleep(0.25)

    renewing = {"pending_timeout": 0.6, "claim_interval": 0.1, "handler_timeout": 0.5}
    c2 = make_consumer(cluster_client, "g", "c2", concurrency=1, buffer_size=10, **renewing)
    c3 = make_consumer(cluster_client, "g", "c3", **renewing)
    for stream in slow:
        c2.subscribe(stream, slow_handler)
        c3.subscribe(stream, slow_handler)
    async with c2:
        await wait_until(lambda: c2.stats().read == 6, what="c2 reads all six")
        async with c3:
            await wait_until(lambda: c2.stats().acked == 6, timeout=15, what="c2 handles six")
    assert c3.stats().claimed == 0
    assert len(busy) == len(set(busy)) == 6


async def test_per_key_order_under_concurrency(
    cluster: LocalCluster, cluster_client: RedisCluster, key_prefix: str
) -> None:
    await check_per_key_order(cluster_client, key_prefix, partitions=3)


async def test_ordered_partitions_shared_by_two_consumers(
    cluster: LocalCluster, cluster_client: RedisCluster, key_prefix: str
) -> None:
    await check_handover(cluster_client, key_prefix)


async def test_held_messages_stay_bounded_with_a_reader_per_slot(
    cluster: LocalCluster, cluster_client: RedisCluster, key_prefix: str
) -> None:
    events = PartitionedStream(f"{key_prefix}events", partitions=6)
    async with AsyncPublisher(redis=cluster_client) as publisher:
        await publisher.publish_many(events.message({"n": i}) for i in range(600))
    buffer_size, concurrency = 3, 2
    bound = buffer_size + concurrency
    peak = 0

    async def handler(msg: Message) -> None:
        nonlocal peak
        stats = consumer.stats()
        peak = max(peak, stats.in_flight + stats.buffered + stats.waiting_retry)
        await asyncio.sleep(0)

    consumer = make_consumer(
        cluster_client, start_id="0", buffer_size=buffer_size, concurrency=concurrency
    )
    consumer.subscribe(events, handler)
    async with consumer:
        while consumer.stats().acked < 600:
            stats = consumer.stats()
            assert stats.read - stats.acked - stats.pending_acks <= bound
            assert len(consumer._holding.messages) + consumer._holding.reserved <= bound
            await asyncio.sleep(0.002)
    assert peak <= bound
    assert consumer.stats().read == 600
    for stream in events.keys:
        assert await pending_of(cluster_client, stream) == 0


async def test_moved_and_ask_redirections_are_followed(make_cluster: Any, key_prefix: str) -> None:
    local: LocalCluster = make_cluster(masters=2)
    client = local.client()
    stream = f"{key_prefix}moving"
    slot = key_slot(stream.encode())
    seen: list[str] = []

    async def handler(msg: Message) -> None:
        seen.append(msg.id)

    fast = {"backoff": FAST, "network_retry": -1}
    consumer = make_consumer(client, start_id="0", read_timeout=0.2, **fast)
    consumer.subscribe(stream, handler)
    try:
        async with AsyncPublisher(redis=client, **fast) as publisher, consumer:
            await publisher.publish(Message(stream, {"n": 0}))
            await wait_until(lambda: len(seen) == 1, what="first message")
            by_port = {node.port: node for node in local.masters()}
            src = by_port[master_port_of(local, stream)]
            dst = next(node for port, node in by_port.items() if port != src.port)
            src_id, dst_id = src.execute("CLUSTER", "MYID"), dst.execute("CLUSTER", "MYID")
            dst.execute("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            src.execute("MIGRATE", dst.host, dst.port, "", 0, 5000, "KEYS", stream)
            # The key lives on dst while the slot still belongs to src: ASK.
            await publisher.publish(Message(stream, {"n": 1}))
            await publisher.publish_many([Message(stream, {"n": 2})])
            for node in (dst, src):
                node.execute("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            # Now src answers MOVED; streamq follows it and rereads the slot map.
            await publisher.publish(Message(stream, {"n": 3}))
            await wait_until(lambda: len(seen) == 4, timeout=15, what="all four handled")
        assert await client.xlen(stream) == 4
        assert int((await client.xpending(stream, "g"))["pending"]) == 0
        assert master_port_of(local, stream) == dst.port
    finally:
        await client.aclose()


async def test_a_dead_master_delays_only_its_own_publishes(
    make_cluster: Any, key_prefix: str
) -> None:
    # Without full coverage the surviving masters keep serving while one is down,
    # however long the test takes (no replica, so no failover either).
    local: LocalCluster = make_cluster(
        masters=3, extra_args=["--cluster-require-full-coverage", "no"]
    )
    client = local.client()
    down, up_1, up_2 = spread_streams(key_prefix)
    dead = local.masters()[0]
    assert dead.port == master_port_of(local, down)
    patient = {"backoff": FAST, "network_retry": -1, "command_timeout": 1.0}
    try:
        async with AsyncPublisher(redis=client, **patient) as publisher:
            try:
                await publisher.publish(Message(up_1, {"n": -1}))  # reads the slot map
                dead.kill()
                stuck = [
                    asyncio.ensure_future(publisher.publish(Message(down, {"n": i})))
                    for i in range(50)
                ]
                await wait_until(
                    lambda: publisher.stats().errors_reported > 0, what="retries to the dead master"
                )
                # Coalesced (the dead master's publishes are in flight), yet not held up.
                healthy = [Message((up_1, up_2)[i % 2], {"n": i}) for i in range(400)]
                burst = asyncio.ensure_future(asyncio.gather(*map(publisher.publish, healthy)))
                await wait_until(burst.done, timeout=20, what="publishes to the healthy masters")
                assert all(isinstance(entry_id, str) for entry_id in burst.result())
                assert not any(task.done() for task in stuck)

                # A publisher that gives up: each publish to the dead master raises,
                # alone or coalesced, and those to the healthy masters still succeed.
                async with AsyncPublisher(
                    redis=client, backoff=FAST, network_retry=2, command_timeout=1.0
                ) as impatient:
                    mixed = [Message((down, up_2)[i % 2], {"n": f"x{i}"}) for i in range(20)]
                    outcomes = await asyncio.gather(
                        *map(impatient.publish, mixed), return_exceptions=True
                    )
                for msg, outcome in zip(mixed, outcomes, strict=True):
                    if msg.stream == down:
                        assert isinstance(outcome, NetworkError), outcome
                    else:
                        assert isinstance(outcome, str), outcome
                        healthy.append(msg)
                assert not any(task.done() for task in stuck)
            finally:
                # Also on failure: aclose() waits for the publishes still retrying.
                if not dead.running:
                    await asyncio.to_thread(dead.restart)
            # Back after a restart (empty, no persistence here): the retries succeed.
            await wait_until(
                lambda: all(task.done() for task in stuck),
                timeout=30,
                what="the dead master's publishes, after its restart",
            )
            ids = [task.result() for task in stuck]
        # Every publish that returned an ID is stored.
        expected: dict[str, set[str]] = defaultdict(set)
        for msg in healthy:
            expected[msg.stream].add(msg.id)
        expected[down].update(ids)
        for stream, wanted in expected.items():
            stored = {entry_id.decode() for entry_id, _ in await client.xrange(stream)}
            assert wanted <= stored, stream
        assert sum(map(len, expected.values())) == 50 + 400 + 10
        assert await client.xlen(down) == 50
    finally:
        await client.aclose()
