"""A master of a 3-master, 3-replica cluster is killed mid-run; nothing acknowledged is lost.

Redis Cluster replicates asynchronously and streamq does not use ``WAIT``: an
entry that the dying master confirmed but had not yet sent to its replica is gone
after the failover. The test tells those apart (published, confirmed, and absent
from the promoted replica) from real losses (present in Redis but never handled),
requires none of the latter, and bounds the former.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest
from helpers import drain_errors, wait_until
from redis.crc import key_slot

from streamq import (
    AsyncConsumer,
    AsyncPublisher,
    Backoff,
    Message,
    NetworkError,
    PartitionedStream,
)
from streamq._servers import LocalCluster

pytestmark = [pytest.mark.anyio, pytest.mark.cluster, pytest.mark.slow]

# Retry for as long as a failover takes (cluster-node-timeout is 2 s here).
RESILIENT = {"backoff": Backoff(min=0.05, max=0.5), "network_retry": -1, "command_timeout": 1.0}


async def test_killing_a_master_mid_run_loses_nothing_acknowledged(
    make_cluster: Callable[..., LocalCluster], key_prefix: str
) -> None:
    local = make_cluster(masters=3, replicas=1, extra_args=["--appendonly", "yes"])
    client = local.client()
    orders = PartitionedStream(f"{key_prefix}orders", partitions=3)
    published: set[tuple[str, str]] = set()
    handled: set[tuple[str, str]] = set()
    stop = asyncio.Event()
    failed_over = asyncio.Event()
    after_failover = 0

    async def handler(msg: Message) -> None:
        handled.add((msg.stream, msg.id))

    async def publish(publisher: AsyncPublisher) -> None:
        nonlocal after_failover
        n = 0
        while not stop.is_set():
            batch = [orders.message({"n": n + i}, key=f"user-{(n + i) % 50}") for i in range(20)]
            n += 20
            await asyncio.gather(*(publisher.publish(m) for m in batch))
            published.update((m.stream, m.id) for m in batch)
            if failed_over.is_set():
                after_failover += len(batch)
            await asyncio.sleep(0.005)

    options = {
        "start_id": "0",
        "read_timeout": 0.5,
        "pending_timeout": 3.0,
        "handler_timeout": 1.0,
        "claim_interval": 0.5,
        **RESILIENT,
    }
    consumers = [
        AsyncConsumer(redis=client, group="g", consumer=f"c{i}", **options) for i in (1, 2)
    ]
    for consumer in consumers:
        consumer.subscribe(orders, handler)
    try:
        async with (
            # Idempotent: a publish retried across the failover is stored once.
            AsyncPublisher(redis=client, idempotent=True, **RESILIENT) as publisher,
            consumers[0],
            consumers[1],
        ):
            producer = asyncio.create_task(publish(publisher))
            await wait_until(lambda: len(handled) >= 500, timeout=20, what="steady state")
            owner = {key: _master_port(local, key) for key in orders.keys}
            killed = await asyncio.to_thread(local.kill_master, 0)
            await asyncio.to_thread(local.wait_for_failover, 30.0)
            failed_over.set()
            await wait_until(lambda: after_failover >= 300, timeout=30, what="publishing resumes")
            stop.set()
            await producer
            present = set()
            numbers: list[bytes] = []
            for stream in orders.keys:
                rows = await client.xrange(stream)
                present |= {(stream, entry_id.decode()) for entry_id, _ in rows}
                numbers += [fields[b"n"] for _, fields in rows]
            await wait_until(
                lambda: present <= handled, timeout=30, what="every stored entry handled"
            )

            async def nothing_pending() -> bool:
                counts = [int((await client.xpending(s, "g"))["pending"]) for s in orders.keys]
                return sum(counts) == 0

            await wait_until(nothing_pending, timeout=30, what="nothing pending")
            errors = [e for c in consumers for e in drain_errors(c)]
            felt = [e for e in errors if isinstance(e, NetworkError) and e.retrying]
            # The publisher retried too, through the lookup of idempotent retries.
            publisher_felt = [e for e in drain_errors(publisher) if isinstance(e, NetworkError)]
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
    lost_by_replication = published - present
    assert killed.port not in {node.port for node in local.masters()}
    assert felt, "the consumers never noticed the failover"
    assert publisher_felt, "the publisher never noticed the failover"
    assert present <= handled
    assert len(numbers) == len(set(numbers)), "a retried publish was stored twice"
    # Only what the dead master confirmed in its last moments may be missing: a
    # few batches at most, never entries of the surviving masters.
    assert len(lost_by_replication) <= 200, len(lost_by_replication)
    survivors = {key for key in orders.keys if owner[key] != killed.port}
    assert 0 < len(survivors) < len(orders.keys)
    assert not {stream for stream, _ in lost_by_replication} & survivors


def _master_port(local: LocalCluster, key: str) -> int:
    slot = key_slot(key.encode())
    return next(port for first, last, port in local.slot_ranges() if first <= slot <= last)
