"""``streamq demo``: publish, consume, fail, retry and dead-letter a few thousand messages.

The demo runs against the Redis at a URL, or starts a throwaway server itself
(``streamq._servers``: ``redis-server`` from PATH, else the binary of the
``streamq[embedded]`` extra) and stops it afterwards, also when interrupted.
It works on keys of its own (``streamq-demo:<random>``) and deletes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis

from ._backoff import Backoff
from ._bench import latency_summary
from ._consumer import AsyncConsumer, ConsumerStats
from ._message import Message
from ._publisher import AsyncPublisher
from ._result import Result, fail
from ._servers import LocalRedis

__all__ = ["DemoSummary", "demo_server", "run_demo"]

#: One message in this many fails for good (and ends in the dead-letter stream).
POISON_EVERY = 100
#: One message in this many fails on its first delivery only (and is retried).
FLAKY_EVERY = 20


@dataclass(frozen=True, slots=True)
class DemoSummary:
    """What the demo did, for the summary table (and ``--json``).

    Attributes:
        server: ``"redis 7.0.15 (started for the demo)"`` or the URL's server.
        stream: The demo's stream (deleted afterwards).
        published: Messages published.
        succeeded: Messages handled successfully (each counted once).
        handler_calls: Handler invocations, retries included.
        retried: Redeliveries after a failure.
        dead_lettered: Messages moved to the dead-letter stream.
        dead_letter_stream_length: ``XLEN`` of the dead-letter stream at the end.
        kept: Whether the stream and its dead letters were left in Redis.
        pending_after: Entries left pending in the group at the end (0 expected).
        seconds: From the first publish until every message was settled.
        throughput: Settled messages per second over ``seconds``.
        latency_ms: Publish-to-handled latency of successful messages:
            ``p50``, ``p90``, ``p99``, ``max`` in milliseconds (retried ones
            include their backoff).
    """

    server: str
    stream: str
    published: int
    succeeded: int
    handler_calls: int
    retried: int
    dead_lettered: int
    dead_letter_stream_length: int
    kept: bool
    pending_after: int
    seconds: float
    throughput: float
    latency_ms: dict[str, float]

    @property
    def complete(self) -> bool:
        """Every message was either handled or dead-lettered, and nothing is left pending."""
        return (
            self.succeeded + self.dead_lettered == self.published
            and self.pending_after == 0
            and self.dead_letter_stream_length == self.dead_lettered
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with ``complete``)."""
        out = asdict(self)
        out["complete"] = self.complete
        return out


@contextlib.asynccontextmanager
async def demo_server(url: str | None, purpose: str = "demo") -> AsyncIterator[tuple[str, str]]:
    """Yield ``(url, description)``: ``url`` itself, or a throwaway server started here.

    Raises:
        ServerNotFoundError: No server binary could be found to start.
        ServerStartError: The server did not start.
    """
    if url is not None:
        yield url, url
        return
    # LocalRedis.close() stops the process and deletes its directory; it runs on
    # every way out of this block, cancellation (Ctrl-C, SIGTERM) included.
    async with LocalRedis() as server:
        binary = server.binary
        version = ".".join(map(str, binary.version))
        yield (
            server.url,
            f"{binary.server_name} {version} ({binary.path}, started for the {purpose})",
        )


async def run_demo(
    url: str,
    *,
    server: str,
    messages: int = 5000,
    rate: float = 5000.0,
    concurrency: int = 32,
    work: float = 0.001,
    give_up_after: float = 50.0,
    keep: bool = False,
    progress: Callable[[int, int, ConsumerStats], None] | None = None,
) -> DemoSummary:
    """Publish ``messages`` at ``rate`` per second and consume them with failures.

    Every :data:`FLAKY_EVERY`-th message fails once and is retried; every
    :data:`POISON_EVERY`-th fails on every delivery and is dead-lettered after
    ``max_retry=2`` (three deliveries).

    Args:
        url: The Redis to use.
        server: How to describe it in the summary.
        messages: How many to publish.
        rate: Publishing pace in messages per second (``0``: as fast as possible).
        concurrency: Handlers running at once.
        work: Seconds each handler call pretends to work (``asyncio.sleep``).
        give_up_after: Give up waiting for the last messages after this many seconds;
            the summary then shows what was settled.
        keep: Leave the stream and its dead-letter stream in Redis (to look at them
            with ``streamq info``, ``dead`` and ``replay``); by default both are deleted.
        progress: Called about ten times a second with ``(settled, total, stats)``.
    """
    stream = f"streamq-demo:{uuid.uuid4().hex[:10]}"
    client = aioredis.Redis.from_url(url)
    consumer = AsyncConsumer(
        redis=client,
        group="demo",
        consumer="demo-1",
        start_id="0",
        max_retry=2,
        concurrency=concurrency,
        backoff=Backoff(min=0.02, max=0.1),
        read_timeout=0.5,
        handler_timeout=5.0,
        shutdown_timeout=5.0,
    )
    latencies: list[float] = []
    succeeded = 0
    calls = 0
    settled = asyncio.Event()

    async def handle(msg: Message) -> Result | None:
        nonlocal succeeded, calls
        calls += 1
        n = int(msg.values["n"])
        if work > 0:
            await asyncio.sleep(work)
        if n % POISON_EVERY == POISON_EVERY - 1:
            raise ValueError(f"order {n}: card declined (simulated, fails every time)")
        if n % FLAKY_EVERY == 7 and msg.deliveries == 1:
            return fail("payment gateway timed out (simulated, fails once)")
        latencies.append(time.time() - float(msg.values["sent"]))
        succeeded += 1
        return None

    consumer.subscribe(stream, handle)
    publisher = AsyncPublisher(redis=client)
    published = 0
    started = time.perf_counter()

    def done() -> int:
        return succeeded + consumer.stats().dead_lettered

    async def publish_all() -> None:
        nonlocal published
        batch = max(int(rate / 100), 1) if rate > 0 else 500
        while published < messages:
            n = min(batch, messages - published)
            sent = f"{time.time():.6f}"
            await publisher.publish_many(
                [Message(stream, {"n": published + i, "sent": sent}) for i in range(n)]
            )
            published += n
            if rate > 0:
                # Paced against the start, so slow rounds are made up for.
                ahead = started + published / rate - time.perf_counter()
                if ahead > 0:
                    await asyncio.sleep(ahead)

    async def watch() -> None:
        while done() < messages:
            if progress is not None:
                progress(done(), messages, consumer.stats())
            await asyncio.sleep(0.1)
        settled.set()

    seconds = 0.0
    try:
        async with consumer, publisher, asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(publish_all()), tg.create_task(watch())]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(give_up_after):
                    await settled.wait()
            seconds = time.perf_counter() - started
            for task in tasks:  # on a timeout, publishing may still be going on
                task.cancel()
        stats = consumer.stats()
        if progress is not None:
            progress(done(), messages, stats)
        summary = await client.xpending(stream, "demo")
        dead_length = int(await client.xlen(f"{stream}:dead"))
    finally:
        if not keep:
            with contextlib.suppress(Exception):
                await client.delete(stream, f"{stream}:dead")
        await client.aclose()
    total = succeeded + stats.dead_lettered
    return DemoSummary(
        server=server,
        stream=stream,
        published=published,
        succeeded=succeeded,
        handler_calls=calls,
        retried=stats.retried,
        dead_lettered=stats.dead_lettered,
        dead_letter_stream_length=dead_length,
        kept=keep,
        pending_after=int(summary["pending"]),
        seconds=seconds,
        throughput=total / seconds if seconds > 0 else 0.0,
        latency_ms={k: v * 1000 for k, v in latency_summary(latencies).items()},
    )
