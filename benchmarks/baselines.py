"""The designs streamq is measured against, each written the way its users would.

* ``raw_inline``: the ceiling. One ``XREADGROUP COUNT 500``, the handler awaited
  inline for each entry, one ``XACK`` for the whole read.
* ``raw_queue``: an ``asyncio.Queue`` and 100 worker tasks, acks batched by an
  acker task (``per_message_ack=True``: one ``XACK`` per message instead).
* ``faststream``: FastStream's ``StreamSub`` with a consumer group.
* ``taskiq``: taskiq-redis' ``RedisStreamBroker`` with one taskiq receiver.
* ``raw_publish_*``: awaited ``XADD``, pipelined ``XADD`` (1000 per round trip),
  and ``XADD`` from many tasks at once.
* ``raw_latency``: the inline loop fed by a paced publisher, timing publish to handler.

Every function returns a :class:`streamq._bench.BenchResult` measured like streamq's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from streamq._bench import (
    PAYLOAD,
    BenchResult,
    Meter,
    fill_stream,
    latency_summary,
    scratch_stream,
)

GROUP = "bench"


async def _noop(entry_id: bytes, fields: dict[bytes, bytes]) -> None:
    """The handler every consume baseline awaits: does nothing, like streamq's no-op."""


async def raw_inline(url: str, *, messages: int = 200_000, count: int = 500) -> BenchResult:
    """XREADGROUP COUNT ``count``, handler inline, one XACK per read."""
    client = aioredis.Redis.from_url(url)
    try:
        async with scratch_stream(url) as stream:
            await fill_stream(client, stream, messages, group=GROUP)
            done = 0
            async with Meter() as meter:
                while done < messages:
                    reply = await client.xreadgroup(
                        GROUP, "c1", {stream: ">"}, count=count, block=2000
                    )
                    for _stream, entries in reply:
                        ids = []
                        for entry_id, fields in entries:
                            await _noop(entry_id, fields)
                            ids.append(entry_id)
                        if ids:
                            await client.xack(stream, GROUP, *ids)
                            done += len(ids)
            return meter.result("raw inline", messages, extra={"count": count})
    finally:
        await client.aclose()


async def raw_queue(
    url: str,
    *,
    messages: int = 200_000,
    workers: int = 100,
    buffer: int = 500,
    per_message_ack: bool = False,
) -> BenchResult:
    """A reader filling an ``asyncio.Queue``, ``workers`` tasks, batched (or per-message) acks."""
    client = aioredis.Redis.from_url(url, max_connections=workers + 10)
    try:
        async with scratch_stream(url) as stream:
            await fill_stream(client, stream, messages, group=GROUP)
            queue: asyncio.Queue[tuple[bytes, dict[bytes, bytes]]] = asyncio.Queue(buffer)
            to_ack: list[bytes] = []
            wake = asyncio.Event()
            finished = asyncio.Event()
            acked = 0

            async def reader() -> None:
                while True:
                    free = buffer - queue.qsize()
                    if free <= 0:
                        await asyncio.sleep(0)
                        continue
                    reply = await client.xreadgroup(
                        GROUP, "c1", {stream: ">"}, count=free, block=2000
                    )
                    for _stream, entries in reply:
                        for entry in entries:
                            await queue.put(entry)

            async def worker() -> None:
                nonlocal acked
                while True:
                    entry_id, fields = await queue.get()
                    await _noop(entry_id, fields)
                    if per_message_ack:
                        await client.xack(stream, GROUP, entry_id)
                        acked += 1
                        if acked == messages:
                            finished.set()
                    else:
                        to_ack.append(entry_id)
                        wake.set()

            async def acker() -> None:
                nonlocal acked, to_ack
                while True:
                    await wake.wait()
                    wake.clear()
                    batch, to_ack = to_ack, []
                    await client.xack(stream, GROUP, *batch)
                    acked += len(batch)
                    if acked == messages:
                        finished.set()

            async with Meter() as meter:
                tasks = [asyncio.create_task(reader())]
                tasks += [asyncio.create_task(worker()) for _ in range(workers)]
                if not per_message_ack:
                    tasks.append(asyncio.create_task(acker()))
                await finished.wait()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            name = "raw queue, XACK per message" if per_message_ack else "raw queue, batched acks"
            return meter.result(
                name,
                messages,
                extra={"workers": workers, "buffer": buffer, "per_message_ack": per_message_ack},
            )
    finally:
        await client.aclose()


async def faststream_consume(
    url: str, *, messages: int = 20_000, max_records: int = 100
) -> BenchResult:
    """FastStream 0.7's ``StreamSub`` with a consumer group (acks one message at a time)."""
    from faststream.redis import RedisBroker, StreamSub

    client = aioredis.Redis.from_url(url)
    try:
        async with scratch_stream(url) as stream:
            await fill_stream(client, stream, messages, group=GROUP)
            broker = RedisBroker(url, logger=None)
            seen = 0

            @broker.subscriber(
                stream=StreamSub(
                    stream,
                    group=GROUP,
                    consumer="c1",
                    max_records=max_records,
                    polling_interval=100,
                )
            )
            async def handler(body: Any) -> None:
                nonlocal seen
                seen += 1

            async with Meter() as meter:
                await broker.start()
                # FastStream acks after the handler returns: done once nothing is pending.
                while True:
                    await asyncio.sleep(0.01)
                    if seen >= messages:
                        pending = await client.xpending(stream, GROUP)
                        if int(pending["pending"]) == 0:
                            break
            await broker.stop()
            return meter.result(
                "FastStream StreamSub", messages, extra={"max_records": max_records}
            )
    finally:
        await client.aclose()


async def taskiq_consume(url: str, *, messages: int = 20_000, workers: int = 100) -> BenchResult:
    """taskiq-redis 1.2's ``RedisStreamBroker`` with one taskiq ``Receiver`` (a worker).

    The backlog holds taskiq's own messages (a no-op task, ~200 bytes of JSON); the
    receiver runs up to ``workers`` tasks at once and acks each message on its own.
    """
    from taskiq.receiver import Receiver
    from taskiq_redis import RedisStreamBroker

    client = aioredis.Redis.from_url(url)
    try:
        async with scratch_stream(url) as stream:
            broker = RedisStreamBroker(
                url, queue_name=stream, consumer_group_name=GROUP, consumer_name="c1"
            )
            seen = 0

            @broker.task(task_name="noop")
            async def noop(order_id: str, amount: str) -> None:
                nonlocal seen
                seen += 1

            # One real kick gives taskiq's wire format; the backlog repeats it.
            await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            await broker.startup()
            await noop.kiq(order_id=PAYLOAD["order_id"], amount=PAYLOAD["amount"])
            [(_, first)] = await client.xrange(stream, count=1)
            await fill_stream(client, stream, messages - 1, {"data": first[b"data"]})
            receiver = Receiver(broker, max_async_tasks=workers, run_startup=False)
            finish = asyncio.Event()
            async with Meter() as meter:
                listener = asyncio.create_task(receiver.listen(finish))
                while True:
                    await asyncio.sleep(0.01)
                    if seen >= messages:
                        pending = await client.xpending(stream, GROUP)
                        if int(pending["pending"]) == 0:
                            break
            finish.set()
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await broker.shutdown()
            return meter.result("taskiq-redis RedisStreamBroker", messages, extra={})
    finally:
        await client.aclose()


async def raw_publish(
    url: str, *, mode: str = "one", messages: int = 20_000, tasks: int = 100
) -> BenchResult:
    """``XADD`` awaited one at a time, pipelined 1000 per round trip, or from ``tasks`` tasks."""
    client = aioredis.Redis.from_url(url, max_connections=tasks + 10)
    try:
        async with scratch_stream(url) as stream:
            await client.xadd(stream, PAYLOAD)  # connect outside the interval
            async with Meter() as meter:
                if mode == "one":
                    for _ in range(messages):
                        await client.xadd(stream, dict(PAYLOAD))
                elif mode == "many":
                    for start in range(0, messages, 1000):
                        pipe = client.pipeline(transaction=False)
                        for _ in range(min(1000, messages - start)):
                            pipe.xadd(stream, dict(PAYLOAD))
                        await pipe.execute()
                elif mode == "concurrent":

                    async def one_task(n: int) -> None:
                        for _ in range(n):
                            await client.xadd(stream, dict(PAYLOAD))

                    share, rest = divmod(messages, tasks)
                    await asyncio.gather(*(one_task(share + (i < rest)) for i in range(tasks)))
                else:
                    raise ValueError(f"unknown mode {mode!r}")
            names = {
                "one": "raw XADD, awaited one at a time",
                "many": "raw XADD, pipelined 1000 per round trip",
                "concurrent": f"raw XADD from {tasks} tasks",
            }
            return meter.result(names[mode], messages, extra={"mode": mode})
    finally:
        await client.aclose()


async def raw_latency(
    url: str, *, rate: float = 5000.0, seconds: float = 4.0, count: int = 500
) -> BenchResult:
    """The inline loop (``XREADGROUP BLOCK``, one XACK per read) fed at a steady ``rate``."""
    from streamq._bench import spawn_paced_publisher

    total = max(int(rate * seconds), 1)
    client = aioredis.Redis.from_url(url)
    try:
        async with scratch_stream(url) as stream:
            await client.xgroup_create(stream, GROUP, id="$", mkstream=True)
            latencies: list[float] = []

            async def handler(entry_id: bytes, fields: dict[bytes, bytes]) -> None:
                latencies.append((time.monotonic_ns() - int(fields[b"t"])) / 1e9)

            async with Meter() as meter:
                proc = spawn_paced_publisher(url, stream, rate, total)
                while len(latencies) < total:
                    reply = await client.xreadgroup(
                        GROUP, "c1", {stream: ">"}, count=count, block=2000
                    )
                    for _stream, entries in reply:
                        ids = []
                        for entry_id, fields in entries:
                            await handler(entry_id, fields)
                            ids.append(entry_id)
                        if ids:
                            await client.xack(stream, GROUP, *ids)
                await asyncio.to_thread(proc.wait)
            summary = latency_summary(latencies[int(rate * 0.5) :])
            return meter.result(
                "raw inline loop",
                total,
                latency_p50=summary["p50"],
                latency_p99=summary["p99"],
                latency_max=summary["max"],
                extra={"p90": summary["p90"]},
            )
    finally:
        await client.aclose()
