"""Redis killed and restarted under running consumers and publishers.

With ``appendonly yes`` and ``appendfsync always`` (what ``LocalRedis(appendonly=True)``
configures), an acknowledged write survives SIGKILL of the server. The consumer and
the publisher are the same objects before and after: they reconnect through their
retry policy, including through the ``LOADING`` replies of a server reading its AOF.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from conftest import MakeServer
from faults.harness import pending_count, stream_ids, wait_until

from streamq import (
    AsyncConsumer,
    AsyncPublisher,
    Backoff,
    ConsumerState,
    Message,
    NetworkError,
    StreamqError,
)
from streamq._servers import LocalRedis, ServerStartError

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

FAST = Backoff(min=0.01, max=0.1)


def _consumer(url: str, **kw: object) -> AsyncConsumer:
    options: dict[str, object] = {
        "group": "g",
        "consumer": "c1",
        "start_id": "0",
        "backoff": FAST,
        "network_retry": -1,
        "command_timeout": 1.0,
        "read_timeout": 0.2,
    }
    options.update(kw)
    return AsyncConsumer(redis=url, **options)


class _Errors:
    """Collects what a consumer or publisher reports."""

    def __init__(self) -> None:
        self.items: list[StreamqError] = []

    async def drain(self, stream: object) -> None:
        async for err in stream:  # type: ignore[attr-defined]
            self.items.append(err)

    def causes(self) -> Counter[str]:
        return Counter(type(e.error).__name__ for e in self.items if isinstance(e, NetworkError))


async def test_consumer_and_publisher_ride_out_redis_kill_and_restart(
    make_server: MakeServer,
) -> None:
    server = make_server(appendonly=True)
    stream = "orders"
    handled: Counter[str] = Counter()

    async def handler(msg: Message) -> None:
        handled[msg.id] += 1

    consumer = _consumer(server.url)
    consumer.subscribe(stream, handler)
    publisher = AsyncPublisher(
        redis=server.url, backoff=FAST, network_retry=-1, command_timeout=1.0
    )
    errors = _Errors()
    published: list[str] = []

    async def publish(n: int) -> None:
        for i in range(n):
            published.append(await publisher.publish(Message(stream, {"n": i})))
            await asyncio.sleep(0.002)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(errors.drain(consumer.errors()))
        tg.create_task(errors.drain(publisher.errors()))
        async with publisher, consumer:
            for _ in range(2):
                task = tg.create_task(publish(200))
                await asyncio.sleep(0.1)
                await asyncio.to_thread(server.restart, kill=True)
                await task
            await publish(50)

            async def done() -> bool:
                return set(handled) >= set(published) and pending_count(server, stream) == 0

            await wait_until(done, 20, "everything published was handled and acked")
            assert consumer.state is ConsumerState.RUNNING
    # Every publish that returned an ID is in Redis, after two SIGKILLs of the server.
    assert set(published) <= set(stream_ids(server, stream))
    assert errors.causes(), "the restarts were not even noticed"


async def test_publish_that_exhausts_network_retry_raises(make_server: MakeServer) -> None:
    server = make_server()
    publisher = AsyncPublisher(redis=server.url, backoff=FAST, network_retry=2, command_timeout=0.5)
    async with publisher:
        assert await publisher.publish(Message("s", {"a": 1}))
        server.stop()
        with pytest.raises(NetworkError) as info:
            await publisher.publish(Message("s", {"a": 2}))
        assert info.value.retrying is False
        # Each retry was reported before it waited.
        retries = [e for e in _buffered(publisher) if isinstance(e, NetworkError) and e.retrying]
        assert len(retries) == 2
        assert publisher.stats().failed == 1
        server.start()
        # Same publisher, server back: publishing works again.
        entry_id = await publisher.publish(Message("s", {"a": 3}))
    assert entry_id in stream_ids(server, "s")


async def test_consumer_stops_with_network_error_after_network_retry(
    make_server: MakeServer,
) -> None:
    server = make_server()
    consumer = _consumer(server.url, network_retry=3, read_timeout=0.1)

    async def handler(msg: Message) -> None:
        return None

    consumer.subscribe("s", handler)
    task = asyncio.ensure_future(consumer.listen())
    await wait_until(_has_group(server, "s"), 5, "the group exists")
    server.stop()
    started = time.monotonic()
    with pytest.raises(NetworkError) as info:
        await asyncio.wait_for(task, 10)
    assert info.value.retrying is False
    assert time.monotonic() - started < 10
    assert consumer.state is ConsumerState.CLOSED


async def test_loading_replies_after_a_restart_are_retried(make_server: MakeServer) -> None:
    """A server loading a big AOF answers LOADING (BusyLoadingError): a network error."""
    try:
        server = make_server(
            appendonly=True,
            extra_args=[
                "--key-load-delay",
                "300",
                "--loading-process-events-interval-bytes",
                "1024",
            ],
        )
    except ServerStartError:
        pytest.skip("this server has no key-load-delay setting to slow its loading down")
    filler = server.client()
    async with filler.pipeline(transaction=False) as pipe:
        for i in range(3000):
            pipe.set(f"filler:{i}", "x" * 100)
        await pipe.execute()
    await filler.bgrewriteaof()

    async def rewritten() -> bool:
        info = await filler.info("persistence")
        return not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]

    await wait_until(rewritten, 10, "the AOF rewrite")
    await filler.aclose()

    handled: list[str] = []

    async def handler(msg: Message) -> None:
        handled.append(msg.id)

    consumer = _consumer(server.url)
    consumer.subscribe("s", handler)
    publisher = AsyncPublisher(
        redis=server.url, backoff=FAST, network_retry=-1, command_timeout=1.0
    )
    errors = _Errors()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(errors.drain(consumer.errors()))
        tg.create_task(errors.drain(publisher.errors()))
        async with publisher, consumer:
            first = await publisher.publish(Message("s", {"n": 0}))
            server.kill()
            restart = tg.create_task(asyncio.to_thread(server.start))
            # Sent while the server is down, then loading: retried until it is ready.
            second = await publisher.publish(Message("s", {"n": 1}))
            await restart

            async def done() -> bool:
                return {first, second} <= set(handled)

            await wait_until(done, 20, "both messages handled")
    assert errors.causes()["BusyLoadingError"] > 0, errors.causes()


def _buffered(owner: AsyncPublisher | AsyncConsumer) -> list[StreamqError]:
    out = []
    stream = owner.errors()
    while (err := stream.get_nowait()) is not None:
        out.append(err)
    return out


def _has_group(server: LocalRedis, stream: str):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        try:
            return bool(server.execute("XINFO", "GROUPS", stream))
        except Exception:
            return False

    return check
