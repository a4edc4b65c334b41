"""``streamq bench``: publish and consume throughput, and latency, with a progress bar.

Deliberately small: three runs against a scratch stream, each timed with wall
clock and CPU time of this process. The benchmark suite in ``benchmarks/``
measures more (baselines, memory, server round trips).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis

from ._consumer import AsyncConsumer
from ._message import Message
from ._publisher import AsyncPublisher

__all__ = ["BenchRun", "run_bench"]

_PAYLOAD = {
    "order_id": "ord-000000123456",
    "customer": "cust-4242",
    "amount": "1234.56",
    "note": "standard delivery, leave at the door",
}

# A server-side loop fills the backlog ~20x faster than XADDs from Python.
_FILL = """
for i = 1, tonumber(ARGV[1]) do
  redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
end
return 1
"""


@dataclass(frozen=True, slots=True)
class BenchRun:
    """One measured run.

    Attributes:
        name: What ran.
        messages: Messages in the measured interval.
        seconds: Wall-clock seconds.
        cpu_seconds: CPU seconds of this process.
        latency_ms: ``p50``/``p90``/``p99``/``max`` in milliseconds (latency run only).
        pending_after: Entries left pending in the group afterwards (0 expected).
    """

    name: str
    messages: int
    seconds: float
    cpu_seconds: float
    latency_ms: dict[str, float] = field(default_factory=dict)
    pending_after: int = 0

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with ``rate`` and ``cpu_us_per_message``."""
        out = asdict(self)
        out["rate"] = self.rate
        out["cpu_us_per_message"] = self.cpu_seconds / self.messages * 1e6 if self.messages else 0
        return out


Tick = Callable[[int, int], None]


async def _poll(tick: Tick, get: Callable[[], int], total: int, done: asyncio.Event) -> None:
    while not done.is_set():
        tick(get(), total)
        await asyncio.sleep(0.1)


async def bench_publish(url: str, stream: str, messages: int, tick: Tick) -> BenchRun:
    """``publish()`` from 100 tasks at once (streamq coalesces them into pipelines)."""
    client = aioredis.Redis.from_url(url)
    count = 0
    try:
        async with AsyncPublisher(redis=client) as publisher:
            await publisher.publish(Message(stream, _PAYLOAD))  # connect outside the timing

            async def worker(n: int) -> None:
                nonlocal count
                for _ in range(n):
                    await publisher.publish(Message(stream, _PAYLOAD))
                    count += 1

            tasks = 100
            share, rest = divmod(messages, tasks)
            finished = asyncio.Event()
            cpu, wall = time.process_time(), time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_poll(tick, lambda: count, messages, finished))
                await asyncio.gather(*(worker(share + (i < rest)) for i in range(tasks)))
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                finished.set()
        tick(count, messages)
        return BenchRun("publish (100 tasks)", messages, wall, cpu)
    finally:
        await client.delete(stream)
        await client.aclose()


async def bench_consume(
    url: str, stream: str, messages: int, concurrency: int, tick: Tick
) -> BenchRun:
    """Drain a backlog of ``messages`` with a no-op handler, until the last ack is stored."""
    client = aioredis.Redis.from_url(url)
    try:
        await client.xgroup_create(stream, "bench", id="0", mkstream=True)
        flat = [x for kv in _PAYLOAD.items() for x in kv]
        filled = 0
        while filled < messages:
            n = min(20_000, messages - filled)
            await client.eval(_FILL, 1, stream, n, *flat)
            filled += n
        consumer = AsyncConsumer(
            redis=client, group="bench", consumer="c1", concurrency=concurrency, read_timeout=0.5
        )
        handled = 0

        async def handler(msg: Message) -> None:
            nonlocal handled
            handled += 1

        consumer.subscribe(stream, handler)
        finished = asyncio.Event()
        cpu, wall = time.process_time(), time.perf_counter()
        async with consumer, asyncio.TaskGroup() as tg:
            tg.create_task(_poll(tick, lambda: consumer.stats().acked, messages, finished))
            # The consumer counts acks but signals none: poll its statistics.
            while consumer.stats().acked < messages:  # noqa: ASYNC110
                await asyncio.sleep(0.002)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            finished.set()
        tick(messages, messages)
        pending = await client.xpending(stream, "bench")
        return BenchRun(
            f"consume (concurrency {concurrency})",
            messages,
            wall,
            cpu,
            pending_after=int(pending["pending"]),
        )
    finally:
        await client.delete(stream)
        await client.aclose()


async def bench_latency(
    url: str, stream: str, rate: float, seconds: float, concurrency: int, tick: Tick
) -> BenchRun:
    """Publish-to-handler latency at a steady ``rate`` (publisher in this process too)."""
    client = aioredis.Redis.from_url(url)
    count = max(int(rate * seconds), 1)
    latencies: list[float] = []
    try:
        consumer = AsyncConsumer(
            redis=client, group="bench", consumer="c1", concurrency=concurrency, start_id="0"
        )

        all_seen = asyncio.Event()

        async def handler(msg: Message) -> None:
            latencies.append((time.monotonic_ns() - int(msg.values["t"])) / 1e9)
            if len(latencies) >= count:
                all_seen.set()

        consumer.subscribe(stream, handler)
        async with consumer, AsyncPublisher(redis=client) as publisher:
            finished = asyncio.Event()
            cpu, wall = time.process_time(), time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_poll(tick, lambda: len(latencies), count, finished))
                for i in range(count):
                    ahead = wall + i / rate - time.perf_counter()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                    await publisher.publish(Message(stream, {"t": time.monotonic_ns(), **_PAYLOAD}))
                await all_seen.wait()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                finished.set()
        tick(count, count)
        # The first half second warms connections and caches up.
        sample = latencies[int(rate * 0.5) :] or latencies
        q = statistics.quantiles(sample, n=100, method="inclusive") if len(sample) > 1 else None
        lat = {
            "p50": (q[49] if q else sample[0]) * 1000,
            "p90": (q[89] if q else sample[0]) * 1000,
            "p99": (q[98] if q else sample[0]) * 1000,
            "max": max(sample) * 1000,
        }
        return BenchRun(f"latency at {rate:,.0f} msg/s", count, wall, cpu, lat)
    finally:
        await client.delete(stream)
        await client.aclose()


async def run_bench(args: argparse.Namespace, url: str, server: str, progress_class: Any) -> int:
    """Run the three measurements and print them (a table, or JSON with ``--json``)."""
    key = f"streamq-bench:{uuid.uuid4().hex[:10]}"
    runs: list[BenchRun] = []

    async def step(label: str, coro_fn: Callable[[Tick], Any]) -> None:
        bar = progress_class(label, mode=args.progress)
        try:
            runs.append(await coro_fn(lambda done, total: bar.update(done, total)))
        finally:
            bar.close()

    messages = max(args.messages, 1)
    await step("publish", lambda t: bench_publish(url, key + ":p", messages, t))
    await step("consume", lambda t: bench_consume(url, key + ":c", messages, args.concurrency, t))
    if args.latency_seconds > 0 and args.latency_rate > 0:
        await step(
            "latency",
            lambda t: bench_latency(
                url, key + ":l", args.latency_rate, args.latency_seconds, args.concurrency, t
            ),
        )
    # A run that left entries unacknowledged measured something else than it claims.
    code = 6 if any(r.pending_after for r in runs) else 0
    if args.json:
        json.dump({"server": server, "runs": [r.as_dict() for r in runs]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return code
    print(f"server: {server}")
    print()
    header = f"{'run':<26} {'messages':>9} {'seconds':>8} {'msg/s':>9} {'CPU us/msg':>10}"
    print(header)
    for r in runs:
        cpu_us = r.cpu_seconds / r.messages * 1e6 if r.messages else 0.0
        print(f"{r.name:<26} {r.messages:>9,} {r.seconds:>8.2f} {r.rate:>9,.0f} {cpu_us:>10.1f}")
    for r in runs:
        if r.latency_ms:
            lat = r.latency_ms
            print()
            print(
                f"latency (publish to handler, {r.name.removeprefix('latency ')}): "
                f"p50 {lat['p50']:.2f} ms  p90 {lat['p90']:.2f} ms  "
                f"p99 {lat['p99']:.2f} ms  max {lat['max']:.2f} ms"
            )
    for r in runs:
        if r.pending_after:
            print(f"\n{r.name}: {r.pending_after:,} entries left pending: the run is not valid")
    return code
