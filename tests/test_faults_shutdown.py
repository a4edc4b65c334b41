"""Graceful shutdown under load: aclose() acks what finished, leaves the rest pending,
and returns within shutdown_timeout even when a handler ignores cancellation."""

from __future__ import annotations

import asyncio
import random

import pytest
from faults.harness import pending_by_consumer, wait_until

from streamq import AsyncConsumer, Backoff, Message
from streamq._servers import LocalRedis

pytestmark = [pytest.mark.anyio, pytest.mark.faults]


def _consumer(server: LocalRedis, **kw: object) -> AsyncConsumer:
    options: dict[str, object] = {
        "group": "g",
        "consumer": "c1",
        "start_id": "0",
        "read_timeout": 0.2,
        "backoff": Backoff(min=0.01, max=0.05),
    }
    options.update(kw)
    return AsyncConsumer(redis=server.url, **options)


async def test_aclose_under_load_acks_exactly_what_finished(
    redis_server: LocalRedis, stream_name: str
) -> None:
    ids = [str(redis_server.execute("XADD", stream_name, "*", "n", str(i))) for i in range(500)]
    rng = random.Random(3)
    finished: list[str] = []

    async def handler(msg: Message) -> None:
        await asyncio.sleep(rng.uniform(0, 0.2))
        finished.append(msg.id)

    consumer = _consumer(redis_server, concurrency=20, buffer_size=50, shutdown_timeout=0.1)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(_at_least(finished, 100), 10, "100 handled")
        # Some handlers finish within shutdown_timeout, the others are cancelled.
        await asyncio.wait_for(consumer.aclose(), 0.1 + 5)
    pending = set(pending_by_consumer(redis_server, stream_name).get("c1", []))
    assert finished, "nothing finished"
    assert not pending & set(finished), "a finished message was left unacked"
    read = {i for i in ids if i in pending or i in finished}
    # Everything read is either acked (finished) or still pending: nothing dropped.
    assert read == pending | set(finished)
    assert len(finished) == len(set(finished))
    assert consumer.stats().acked == len(finished)
    assert len(pending) > 0  # the buffered and cancelled ones


async def test_aclose_returns_even_if_a_handler_ignores_cancellation(
    redis_server: LocalRedis, stream_name: str
) -> None:
    entry_id = str(redis_server.execute("XADD", stream_name, "*", "a", "1"))
    running = asyncio.Event()
    let_go = asyncio.Event()
    ignored = 0

    async def stubborn(msg: Message) -> None:
        nonlocal ignored
        running.set()
        while not let_go.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                ignored += 1  # a badly written handler: swallows cancellation

    consumer = _consumer(redis_server, handler_timeout=0, shutdown_timeout=0.3)
    consumer.subscribe(stream_name, stubborn)
    task = asyncio.ensure_future(consumer.listen())
    await asyncio.wait_for(running.wait(), 5)
    # shutdown_timeout plus one ack round trip; the margin is for a slow machine.
    await asyncio.wait_for(consumer.aclose(), 0.3 + 3)
    assert ignored >= 1
    assert pending_by_consumer(redis_server, stream_name) == {"c1": [entry_id]}
    # Once the handler gives up, the worker takes nothing more and listen() ends.
    let_go.set()
    await asyncio.wait_for(task, 5)


def _at_least(items: list[str], n: int):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return len(items) >= n

    return check
