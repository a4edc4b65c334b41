"""The effect of each consumer option, including every 0 / negative meaning."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import redis.asyncio
from conftest import MakeProxy
from helpers import add, drain_errors, make_consumer, pending, pending_count, wait_group, wait_until

from streamq import ConsumerState, Message, NetworkError

pytestmark = pytest.mark.anyio

Client = redis.asyncio.Redis


class Gauge:
    """Counts handlers running at once and remembers the peak."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    async def run(self, seconds: float) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.now -= 1


@pytest.mark.parametrize(("concurrency", "expected"), [(0, 1), (1, 1), (4, 4)])
async def test_concurrency(
    redis_client: Client, stream_name: str, concurrency: int, expected: int
) -> None:
    await add(redis_client, stream_name, 12)
    gauge = Gauge()
    order: list[str] = []

    async def handler(msg: Message) -> None:
        order.append(msg.text("n"))
        await gauge.run(0.02)

    consumer = make_consumer(redis_client, start_id="0", concurrency=concurrency)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 12)
    assert gauge.peak == expected
    if expected == 1:
        # One worker: handled in the order Redis delivered them.
        assert order == [str(i) for i in range(12)]


@pytest.mark.parametrize(("buffer_size", "delivered"), [(0, 1), (3, 4)])
async def test_buffer_size_limits_read_ahead(
    redis_client: Client, stream_name: str, buffer_size: int, delivered: int
) -> None:
    await add(redis_client, stream_name, 10)
    release = asyncio.Event()

    async def handler(msg: Message) -> None:
        await release.wait()

    consumer = make_consumer(redis_client, start_id="0", concurrency=1, buffer_size=buffer_size)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().in_flight == 1)
        # Give the reader every chance to read more than it may.
        await asyncio.sleep(0.2)
        stats = consumer.stats()
        assert (stats.read, stats.buffered) == (delivered, delivered - 1)
        assert await pending_count(redis_client, stream_name) == delivered
        release.set()
        await wait_until(lambda: consumer.stats().acked == 10)
    assert await pending_count(redis_client, stream_name) == 0


async def test_memory_stays_bounded_on_a_long_stream(
    redis_client: Client, stream_name: str
) -> None:
    pipe = redis_client.pipeline(transaction=False)
    for i in range(1500):
        pipe.xadd(stream_name, {"n": i})
    await pipe.execute()
    buffer_size, concurrency = 5, 2
    bound = buffer_size + concurrency
    peak_held = 0
    peak_pel = 0

    async def handler(msg: Message) -> None:
        nonlocal peak_held
        stats = consumer.stats()
        peak_held = max(peak_held, stats.in_flight + stats.buffered + stats.waiting_retry)
        await asyncio.sleep(0.0005)

    consumer = make_consumer(
        redis_client, start_id="0", buffer_size=buffer_size, concurrency=concurrency
    )
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_group(redis_client, stream_name)
        while consumer.stats().acked < 1500:
            stats = consumer.stats()
            assert stats.read - stats.acked - stats.pending_acks <= bound
            # Redis agrees: the pending list holds what is held plus acks not yet
            # sent, which is never more than what was handled meanwhile.
            peak_pel = max(peak_pel, await pending_count(redis_client, stream_name))
            await asyncio.sleep(0.005)
    assert peak_held <= bound
    assert peak_pel <= 2 * bound
    assert consumer.stats().read == 1500


async def test_read_timeout_zero_blocks_until_an_entry_arrives(
    redis_client: Client, stream_name: str
) -> None:
    seen: list[str] = []

    async def handler(msg: Message) -> None:
        seen.append(msg.id)

    # command_timeout far below the idle time: a blocking read must not trip it.
    consumer = make_consumer(redis_client, read_timeout=0, command_timeout=0.1)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_group(redis_client, stream_name)
        await asyncio.sleep(0.4)
        ids = await add(redis_client, stream_name, 1)
        await wait_until(lambda: seen == ids)
        started = time.monotonic()
        await asyncio.wait_for(consumer.aclose(), 5)  # shutdown still works
        assert time.monotonic() - started < 5
    assert drain_errors(consumer) == []
    assert await pending_count(redis_client, stream_name) == 0


async def test_blocking_read_longer_than_command_timeout(
    redis_client: Client, stream_name: str
) -> None:
    # XREADGROUP BLOCK 500 ms on connections whose socket timeout is 300 ms. (Redis
    # answers a timed-out BLOCK up to 1/hz = 100 ms late, so the slack is kept above that.)
    async def handler(msg: Message) -> None:
        return None

    consumer = make_consumer(redis_client, read_timeout=0.5, command_timeout=0.3)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_group(redis_client, stream_name)
        await asyncio.sleep(1.1)  # two idle reads
        await add(redis_client, stream_name, 1)
        await wait_until(lambda: consumer.stats().acked == 1)
    assert drain_errors(consumer) == []


async def test_handler_timeout_zero_means_none(redis_client: Client, stream_name: str) -> None:
    await add(redis_client, stream_name, 1)
    calls = 0

    async def handler(msg: Message) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)

    consumer = make_consumer(redis_client, start_id="0", handler_timeout=0, claim_interval=0)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 1)
    assert calls == 1
    assert drain_errors(consumer) == []


# -- network_retry -------------------------------------------------------------------


async def test_network_retry_negative_retries_until_redis_is_back(
    redis_client: Client, stream_name: str, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()
    seen: list[str] = []

    async def handler(msg: Message) -> None:
        seen.append(msg.id)

    consumer = make_consumer(proxy.url(), network_retry=-1)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_group(redis_client, stream_name)
        proxy.refuse()
        proxy.cut()
        # Far more retries than any finite default would allow.
        await wait_until(lambda: consumer.stats().errors_reported >= 30, what="30 retries")
        assert consumer.state is ConsumerState.RUNNING
        errors = drain_errors(consumer)
        assert all(isinstance(e, NetworkError) and e.retrying for e in errors)
        assert all(e.backoff is not None for e in errors)  # type: ignore[attr-defined]
        proxy.refuse(False)
        ids = await add(redis_client, stream_name, 2)
        await wait_until(lambda: seen == ids, what="messages after the outage")
        await wait_until(lambda: _no_pending(redis_client, stream_name))


async def _no_pending(client: Client, stream: str) -> bool:
    return await pending_count(client, stream) == 0


@pytest.mark.parametrize("retries", [0, 3])
async def test_network_retry_exhausted_is_fatal(
    redis_client: Client, stream_name: str, make_proxy: MakeProxy, retries: int
) -> None:
    proxy = await make_proxy()

    async def handler(msg: Message) -> None:
        return None

    consumer = make_consumer(proxy.url(), network_retry=retries)
    consumer.subscribe(stream_name, handler)

    async def run() -> None:
        async with consumer:
            await wait_group(redis_client, stream_name)
            proxy.refuse()
            proxy.cut()
            await wait_until(lambda: consumer.state is ConsumerState.CLOSED, what="fatal stop")

    with pytest.raises(NetworkError) as info:
        await run()
    assert info.value.retrying is False
    assert consumer.state is ConsumerState.CLOSED
    reported = drain_errors(consumer)
    # ``retries`` retries reported (0: never retried), each with its wait.
    assert len(reported) == retries
    assert all(isinstance(e, NetworkError) and e.retrying for e in reported)


async def test_listen_raises_fatal_network_error(stream_name: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def handler(msg: Message) -> None:
        return None

    consumer = make_consumer(f"redis://127.0.0.1:{port}/0", network_retry=2)
    consumer.subscribe(stream_name, handler)
    with pytest.raises(NetworkError):
        await asyncio.wait_for(consumer.listen(), 10)
    assert len(drain_errors(consumer)) == 2
    await consumer.aclose()


async def test_pending_rows_belong_to_the_consumer(redis_client: Client, stream_name: str) -> None:
    # XPENDING shows what a consumer holds under its own name.
    await add(redis_client, stream_name, 2)
    release = asyncio.Event()

    async def handler(msg: Message) -> None:
        await release.wait()

    consumer = make_consumer(redis_client, consumer="worker-7", start_id="0", concurrency=2)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().in_flight == 2)
        rows = await pending(redis_client, stream_name)
        assert {r["consumer"] for r in rows} == {"worker-7"}
        release.set()
