"""Network faults between streamq and Redis, injected by the FaultProxy.

Connections reset mid-command, slowed down, stalled (black-holed) or refused are
retried by streamq's own retry layer; nothing is lost and nothing hangs: a stalled
blocking read is given up after ``read_timeout + command_timeout``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from conftest import MakeProxy
from faults.harness import consumer_seen, pending_count, stream_ids, wait_until

from streamq import AsyncConsumer, AsyncPublisher, Backoff, Message, NetworkError, StreamqError
from streamq._servers import LocalRedis

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

FAST = Backoff(min=0.01, max=0.1)


def _consumer(url: str, **kw: object) -> AsyncConsumer:
    options: dict[str, object] = {
        "group": "g",
        "consumer": "c1",
        "start_id": "0",
        "backoff": FAST,
        "network_retry": -1,
        "command_timeout": 0.5,
        "read_timeout": 0.3,
    }
    options.update(kw)
    return AsyncConsumer(redis=url, **options)


async def _collect(stream: object, into: list[StreamqError]) -> None:
    async for err in stream:  # type: ignore[attr-defined]
        into.append(err)


async def test_cut_delayed_and_refused_connections_lose_nothing(
    redis_server: LocalRedis, make_proxy: MakeProxy, stream_name: str
) -> None:
    proxy = await make_proxy()
    handled: Counter[str] = Counter()

    async def handler(msg: Message) -> None:
        handled[msg.id] += 1

    consumer = _consumer(proxy.url(), concurrency=4)
    consumer.subscribe(stream_name, handler)
    publisher = AsyncPublisher(redis=proxy.url(), backoff=FAST, network_retry=-1)
    published: list[str] = []
    errors: list[StreamqError] = []

    async def publish() -> None:
        for i in range(400):
            published.append(await publisher.publish(Message(stream_name, {"n": i})))
            await asyncio.sleep(0.002)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(_collect(consumer.errors(), errors))
        async with publisher, consumer:
            flow = tg.create_task(publish())
            while not flow.done():
                await asyncio.sleep(0.1)
                proxy.cut()
                await asyncio.sleep(0.1)
                proxy.set_delay(0.01)
                await asyncio.sleep(0.1)
                proxy.set_delay(0)
                proxy.refuse(True)
                proxy.cut()
                await asyncio.sleep(0.1)
                proxy.refuse(False)

            async def done() -> bool:
                return set(handled) >= set(published) and (
                    pending_count(redis_server, stream_name) == 0
                )

            await wait_until(done, 20, "everything handled and acked")
    assert proxy.connections_cut > 0
    assert proxy.connections_refused > 0
    assert set(published) <= set(stream_ids(redis_server, stream_name))
    assert any(isinstance(e, NetworkError) and e.retrying for e in errors)
    assert not any(isinstance(e, NetworkError) and not e.retrying for e in errors)


async def test_a_stalled_read_is_given_up_after_read_timeout_plus_command_timeout(
    redis_server: LocalRedis, make_proxy: MakeProxy, stream_name: str
) -> None:
    proxy = await make_proxy()
    handled: list[str] = []

    async def handler(msg: Message) -> None:
        handled.append(msg.id)

    consumer = _consumer(proxy.url(), read_timeout=0.3, command_timeout=0.5, claim_interval=0.2)
    consumer.subscribe(stream_name, handler)
    errors: list[StreamqError] = []
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_collect(consumer.errors(), errors))
        async with consumer:
            await wait_until(consumer_seen(redis_server, stream_name), 5, "the consumer reads")
            proxy.blackhole(True)
            stalled_at = time.monotonic()
            # Published straight to Redis while the consumer's connections stall.
            entry_id = str(redis_server.execute("XADD", stream_name, "*", "a", "1"))

            def timed_out() -> list[StreamqError]:
                return [
                    e
                    for e in errors
                    if isinstance(e, NetworkError) and isinstance(e.error, TimeoutError)
                ]

            async def noticed() -> bool:
                return bool(timed_out())

            # read_timeout + max(command_timeout, 1 s) = 1.3 s; the deadline leaves
            # room for a slow machine, not for a hang.
            await wait_until(noticed, 5, "the stalled read timed out")
            noticed_after = time.monotonic() - stalled_at
            proxy.blackhole(False)

            async def delivered() -> bool:
                return entry_id in handled and pending_count(redis_server, stream_name) == 0

            await wait_until(delivered, 10, "the entry is handled once traffic flows")
    assert timed_out()[0].retrying
    print(f"stall noticed after {noticed_after:.2f} s")


async def test_aclose_while_black_holed_returns(
    redis_server: LocalRedis, make_proxy: MakeProxy, stream_name: str
) -> None:
    proxy = await make_proxy()

    async def handler(msg: Message) -> None:
        return None

    consumer = _consumer(proxy.url(), read_timeout=5.0, command_timeout=0.5, shutdown_timeout=0.5)
    consumer.subscribe(stream_name, handler)
    task = asyncio.ensure_future(consumer.listen())
    await wait_until(consumer_seen(redis_server, stream_name), 5, "the consumer reads")
    proxy.blackhole(True)
    await asyncio.sleep(0.2)
    # The read blocks for 5 s and its connection is stalled: aclose() cancels it.
    await asyncio.wait_for(consumer.aclose(), 5)
    await asyncio.wait_for(task, 1)
    proxy.blackhole(False)
