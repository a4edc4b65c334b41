"""Measurements of streamq's own throughput, CPU cost, latency and memory.

These are the streamq halves of the benchmarks in ``benchmarks/`` (which add the
baselines: raw redis-py loops, FastStream, ...) and the measurements of the
``streamq bench`` command (which adds progress bars through ``progress``). Each
function runs against a Redis given by URL, works on a stream key of its own
(``streamq-bench:<random>``, deleted afterwards) and returns a
:class:`BenchResult`. They are meant to run one at a time in a process of their
own: CPU time and RSS are those of the whole process.

Example:
    >>> result = asyncio.run(run_consume_benchmark("redis://127.0.0.1:6400/0"))  # doctest: +SKIP
    >>> print(f"{result.rate:,.0f} msg/s, {result.cpu_per_message * 1e6:.1f} us CPU/msg")
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import redis
import redis.asyncio as aioredis

from ._backoff import Backoff
from ._consumer import AsyncConsumer
from ._message import Message
from ._publisher import AsyncPublisher
from ._result import Result, fail

__all__ = [
    "PAYLOAD",
    "BenchResult",
    "Meter",
    "Progress",
    "PublishMode",
    "RssSampler",
    "fill_stream",
    "latency_summary",
    "paced_publish",
    "rss_bytes",
    "run_consume_benchmark",
    "run_latency_benchmark",
    "run_publish_benchmark",
    "scratch_stream",
    "spawn_paced_publisher",
]

PAYLOAD: dict[str, str] = {
    "order_id": "ord-000000123456",
    "customer": "cust-4242",
    "amount": "1234.56",
    "note": "standard delivery, leave at the door",
}
"""The message every benchmark sends: 4 fields, about 100 bytes with their names."""

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` about ten times a second during a measurement."""

PublishMode = Literal["one", "many", "concurrent"]
"""How :func:`run_publish_benchmark` publishes: awaited one at a time, ``publish_many``
in lists of 1000, or ``publish`` from many tasks at once."""

# Filling a stream with a server-side loop is ~20x faster than from Python, and
# makes setup time negligible next to what is measured.
_FILL_SCRIPT = """
local n = tonumber(ARGV[1])
for i = 1, n do
  redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
end
return n
"""
_FILL_CHUNK = 20_000


@dataclass(frozen=True, slots=True)
class BenchResult:
    """What one measured run did.

    Attributes:
        name: What ran, e.g. ``"streamq consume"``.
        messages: Messages consumed or published in the measured interval.
        seconds: Wall-clock time of the measured interval.
        cpu_seconds: CPU time (user + system) of this process in the interval.
        rss_before: Resident memory in bytes when the interval started.
        rss_after: Resident memory in bytes when it ended.
        rss_peak: Highest resident memory sampled during the interval.
        latency_p50: Median latency in seconds, for latency runs (else ``None``).
        latency_p99: 99th percentile latency in seconds (else ``None``).
        latency_max: Highest latency in seconds (else ``None``).
        extra: Anything else measured (round trips, settings), by name.
    """

    name: str
    messages: int
    seconds: float
    cpu_seconds: float
    rss_before: int
    rss_after: int
    rss_peak: int
    latency_p50: float | None = None
    latency_p99: float | None = None
    latency_max: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_per_message(self) -> float:
        """CPU seconds per message."""
        return self.cpu_seconds / self.messages if self.messages else 0.0

    @property
    def rss_growth(self) -> int:
        """Bytes the resident memory grew above its starting point, at the peak."""
        return self.rss_peak - self.rss_before

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the derived figures (rate, CPU per message) included."""
        out = asdict(self)
        out["rate"] = self.rate
        out["cpu_per_message"] = self.cpu_per_message
        out["rss_growth"] = self.rss_growth
        return out


def rss_bytes() -> int:
    """This process' resident memory in bytes (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize()
    except OSError:  # not Linux: the peak is the best available figure
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class RssSampler:
    """Samples the resident memory every ``interval`` seconds while active, keeping the peak.

    Use as ``async with RssSampler() as rss: ...`` and read ``rss.before``,
    ``rss.peak`` and ``rss.after``.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.before = self.peak = self.after = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RssSampler:
        self.before = self.peak = rss_bytes()
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.after = rss_bytes()
        self.peak = max(self.peak, self.after)

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.peak = max(self.peak, rss_bytes())


class Meter:
    """Wall clock, CPU time and RSS over one measured interval: ``async with Meter() as m``.

    After the block, :meth:`result` builds the :class:`BenchResult`.
    """

    def __init__(self) -> None:
        self.rss = RssSampler()
        self.wall = self.cpu = 0.0

    async def __aenter__(self) -> Meter:
        await self.rss.__aenter__()
        self.cpu = time.process_time()
        self.wall = time.perf_counter()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu
        await self.rss.__aexit__()

    def result(self, name: str, messages: int, **kwargs: Any) -> BenchResult:
        """The measured interval as a result (``kwargs``: latencies, ``extra``)."""
        return BenchResult(
            name=name,
            messages=messages,
            seconds=self.wall,
            cpu_seconds=self.cpu,
            rss_before=self.rss.before,
            rss_after=self.rss.after,
            rss_peak=self.rss.peak,
            **kwargs,
        )


@contextlib.asynccontextmanager
async def scratch_stream(url: str, prefix: str = "streamq-bench") -> AsyncIterator[str]:
    """A fresh stream key on ``url``'s server, deleted (with its dead letters) on exit."""
    key = f"{prefix}:{uuid.uuid4().hex[:12]}"
    try:
        yield key
    finally:
        client = aioredis.Redis.from_url(url)
        try:
            await client.delete(key, f"{key}:dead")
        finally:
            await client.aclose()


async def fill_stream(
    client: aioredis.Redis,
    stream: str,
    count: int,
    values: dict[str, str | bytes] | None = None,
    *,
    group: str | None = None,
) -> None:
    """Append ``count`` copies of ``values`` (default :data:`PAYLOAD`) with a server-side loop.

    With ``group``, the consumer group is created first at the stream's start, so
    that it sees every entry.
    """
    if group is not None:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    flat: list[str | bytes] = []
    for k, v in (values or PAYLOAD).items():
        flat += [k, v]
    done = 0
    while done < count:
        n = min(_FILL_CHUNK, count - done)
        await client.eval(_FILL_SCRIPT, 1, stream, n, *flat)
        done += n


async def _wait_until(predicate: Callable[[], bool], poll: float = 0.001) -> None:
    # Polls counters (stats()) that have no event to wait on.
    while not predicate():  # noqa: ASYNC110
        await asyncio.sleep(poll)


@contextlib.asynccontextmanager
async def _reporting(
    progress: Progress | None, done: Callable[[], int], total: int
) -> AsyncIterator[None]:
    """Call ``progress(done(), total)`` every 0.1 s while the block runs, and at its end."""
    if progress is None:
        yield
        return

    async def poll() -> None:
        while True:
            progress(done(), total)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(poll())
    try:
        yield
    finally:
        task.cancel()
        # wait(), not await task: a cancellation of this task must still go through.
        await asyncio.wait([task])
    progress(done(), total)


async def run_consume_benchmark(
    url: str,
    *,
    messages: int = 200_000,
    concurrency: int = 100,
    buffer_size: int | None = None,
    fail_every: int = 0,
    retry_backoff: float = 0.01,
    read_timeout: float | None = None,
    handler_timeout: float | None = None,
    name: str = "streamq consume",
    progress: Progress | None = None,
) -> BenchResult:
    """Drain a backlog of ``messages`` entries with an :class:`AsyncConsumer` and a no-op handler.

    The interval runs from the consumer's start until Redis confirmed the ack of
    the last message. Afterwards the group's pending list is checked to be empty
    (``extra["pending_after"]``), and the server's per-command call counts during
    the interval are in ``extra["commands"]`` (round trips per command type).

    Args:
        url: The Redis to use.
        messages: Backlog size.
        concurrency: ``ConsumerOptions.concurrency``.
        buffer_size: ``ConsumerOptions.buffer_size`` (``None``: the default).
        fail_every: With ``n > 0``, every n-th first delivery fails (``fail()``) and
            is retried after ``retry_backoff`` seconds; ``10`` fails 10%.
        retry_backoff: Backoff of those retries.
        read_timeout: ``ConsumerOptions.read_timeout`` (``None``: the default).
        handler_timeout: ``ConsumerOptions.handler_timeout`` (``None``: the default).
        name: The result's name.
        progress: Told the messages acknowledged so far.
    """
    group = "bench"
    client = aioredis.Redis.from_url(url)
    try:
        async with scratch_stream(url) as stream:
            await fill_stream(client, stream, messages, group=group)
            options: dict[str, Any] = {
                "redis": client,
                "group": group,
                "consumer": "c1",
                "concurrency": concurrency,
                "backoff": Backoff(min=retry_backoff, max=max(retry_backoff, 0.001) * 2),
            }
            if buffer_size is not None:
                options["buffer_size"] = buffer_size
            if read_timeout is not None:
                options["read_timeout"] = read_timeout
            if handler_timeout is not None:
                options["handler_timeout"] = handler_timeout
            consumer = AsyncConsumer(**options)
            succeeded = 0
            seen = 0
            done = asyncio.Event()
            failure = fail("benchmark failure", backoff=retry_backoff)

            async def handler(msg: Message) -> Result | None:
                nonlocal succeeded, seen
                seen += 1
                if fail_every and msg.deliveries == 1 and seen % fail_every == 0:
                    return failure
                succeeded += 1
                if succeeded == messages:
                    done.set()
                return None

            consumer.subscribe(stream, handler)

            def acked() -> int:
                return consumer.stats().acked

            before = await _command_counts(client)
            # The interval covers the consumer's start (it runs in the background
            # from here) but not its shutdown.
            async with consumer:
                async with _reporting(progress, acked, messages), Meter() as meter:
                    await done.wait()
                    await _wait_until(lambda: acked() >= messages)
                stats = consumer.stats()
            after = await _command_counts(client)
            pending = await client.xpending(stream, group)
            return meter.result(
                name,
                messages,
                extra={
                    "concurrency": concurrency,
                    "buffer_size": consumer.options.buffer_size,
                    "fail_every": fail_every,
                    "handled": seen,
                    "retried": stats.retried,
                    "pending_after": int(pending["pending"]),
                    "commands": _diff_counts(before, after),
                },
            )
    finally:
        await client.aclose()


async def run_publish_benchmark(
    url: str,
    *,
    mode: PublishMode = "one",
    messages: int = 20_000,
    tasks: int = 100,
    idempotent: bool = False,
    name: str | None = None,
    progress: Progress | None = None,
) -> BenchResult:
    """Publish ``messages`` copies of :data:`PAYLOAD` with an :class:`AsyncPublisher`.

    Args:
        url: The Redis to use.
        mode: ``"one"``: ``await publish()`` one after the other; ``"many"``:
            ``publish_many`` on lists of 1000; ``"concurrent"``: ``tasks`` tasks each
            calling ``await publish()`` in a loop (streamq coalesces them).
        messages: How many to publish.
        tasks: Concurrent tasks in ``"concurrent"`` mode.
        idempotent: Publish with ``PublisherOptions(idempotent=True)``.
        name: The result's name (default ``"streamq publish <mode>"``).
        progress: Told the messages published so far.
    """
    client = aioredis.Redis.from_url(url)
    try:
        publisher = AsyncPublisher(redis=client, idempotent=idempotent)
        async with scratch_stream(url) as stream, publisher:
            # Connects (and warms up) outside the measured interval, like the baselines.
            await publisher.publish(Message(stream, PAYLOAD))
            before = await _command_counts(client)

            def published() -> int:
                return publisher.stats().published - 1  # not the warm-up message

            async with _reporting(progress, published, messages), Meter() as meter:
                if mode == "one":
                    for _ in range(messages):
                        await publisher.publish(Message(stream, PAYLOAD))
                elif mode == "many":
                    for start in range(0, messages, 1000):
                        n = min(1000, messages - start)
                        await publisher.publish_many([Message(stream, PAYLOAD) for _ in range(n)])
                elif mode == "concurrent":

                    async def one_task(n: int) -> None:
                        for _ in range(n):
                            await publisher.publish(Message(stream, PAYLOAD))

                    share, rest = divmod(messages, tasks)
                    await asyncio.gather(
                        *(one_task(share + (i < rest)) for i in range(tasks) if share + (i < rest))
                    )
                else:
                    raise ValueError(f"mode: expected 'one', 'many' or 'concurrent', got {mode!r}")
            after = await _command_counts(client)
            length = await client.xlen(stream)
            stats = publisher.stats()
            return meter.result(
                name or f"streamq publish {mode}",
                messages,
                extra={
                    "mode": mode,
                    "tasks": tasks if mode == "concurrent" else 1,
                    "stored": int(length) - 1,
                    "batches": stats.batches,
                    "commands": _diff_counts(before, after),
                },
            )
    finally:
        await client.aclose()


def latency_summary(latencies: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max of ``latencies`` (seconds)."""
    if not latencies:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    if len(latencies) == 1:
        q = latencies * 99
    else:
        q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98], "max": max(latencies)}


def paced_publish(url: str, stream: str, rate: float, count: int) -> None:
    """Publish ``count`` entries at a steady ``rate`` per second, each stamped with its send time.

    Blocking (a plain redis-py client): run it in a process of its own. Field ``t``
    holds ``time.monotonic_ns()`` (one clock for all processes on a machine) taken
    just before the ``XADD`` is sent.
    """
    client = redis.Redis.from_url(url)
    try:
        interval = 1.0 / rate
        start = time.monotonic()
        for i in range(count):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            fields: dict[Any, Any] = {"t": time.monotonic_ns(), **PAYLOAD}
            client.xadd(stream, fields)
    finally:
        client.close()


def spawn_paced_publisher(
    url: str, stream: str, rate: float, count: int
) -> subprocess.Popen[bytes]:
    """Run :func:`paced_publish` in a new Python process; the caller waits for it."""
    code = (
        "import os, sys; from streamq._bench import paced_publish; paced_publish("
        "os.environ['STREAMQ_BENCH_URL'], sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))"
    )
    # The URL may hold a password: in the environment, not on the command line
    # that every user of the machine can list.
    env = {**os.environ, "STREAMQ_BENCH_URL": url}
    return subprocess.Popen([sys.executable, "-c", code, stream, str(rate), str(count)], env=env)


async def _measure_latency(
    url: str,
    stream: str,
    group: str,
    count: int,
    start: Callable[[], Awaitable[None]],
    warmup: int,
    *,
    concurrency: int = 100,
    buffer_size: int | None = None,
    read_timeout: float | None = None,
    name: str = "streamq latency",
    progress: Progress | None = None,
) -> BenchResult:
    """Consume ``count`` stamped entries with an :class:`AsyncConsumer`, timing publish to handler.

    ``start()`` is awaited once the consumer listens; it must make ``count``
    entries with a ``t`` field (see :func:`paced_publish`) arrive. The first
    ``warmup`` latencies are left out (unless that leaves none).
    """
    client = aioredis.Redis.from_url(url)
    try:
        latencies: list[float] = []
        done = asyncio.Event()

        async def handler(msg: Message) -> None:
            now = time.monotonic_ns()
            latencies.append((now - int(msg.values["t"])) / 1e9)
            if len(latencies) == count:
                done.set()

        options: dict[str, Any] = {
            "redis": client,
            "group": group,
            "consumer": "c1",
            "concurrency": concurrency,
        }
        if buffer_size is not None:
            options["buffer_size"] = buffer_size
        if read_timeout is not None:
            options["read_timeout"] = read_timeout
        consumer = AsyncConsumer(**options)
        consumer.subscribe(stream, handler)
        async with consumer:
            await _wait_until(lambda: consumer.stats().state.value == "running", 0.01)
            async with _reporting(progress, lambda: len(latencies), count), Meter() as meter:
                await start()
                await done.wait()
        summary = latency_summary(latencies[warmup:] or latencies)
        return meter.result(
            name,
            count,
            latency_p50=summary["p50"],
            latency_p99=summary["p99"],
            latency_max=summary["max"],
            extra={"p90": summary["p90"], "concurrency": concurrency},
        )
    finally:
        await client.aclose()


async def run_latency_benchmark(
    url: str,
    *,
    rate: float = 5000.0,
    seconds: float = 4.0,
    concurrency: int = 100,
    buffer_size: int | None = None,
    read_timeout: float | None = None,
    name: str = "streamq latency",
    progress: Progress | None = None,
) -> BenchResult:
    """Latency from publish to handler start at a steady ``rate`` (publisher in a subprocess).

    The first half second of messages is a warm-up and left out of the percentiles.
    ``seconds``/``messages`` in the result cover the whole run, so ``rate`` is the
    offered load, not a capacity. ``progress`` is told the messages handled so far.
    """
    count = max(int(rate * seconds), 1)
    group = "bench"
    client = aioredis.Redis.from_url(url)
    try:
        async with scratch_stream(url) as stream:
            await client.xgroup_create(stream, group, id="$", mkstream=True)

            async def start() -> None:
                proc = spawn_paced_publisher(url, stream, rate, count)
                await asyncio.to_thread(proc.wait)

            return await _measure_latency(
                url,
                stream,
                group,
                count,
                start,
                warmup=int(rate * 0.5),
                concurrency=concurrency,
                buffer_size=buffer_size,
                read_timeout=read_timeout,
                name=name,
                progress=progress,
            )
    finally:
        await client.aclose()


async def _command_counts(client: aioredis.Redis) -> dict[str, int]:
    try:
        info = await client.info("commandstats")
    except redis.ResponseError:
        # A user without INFO (ACL): the counts are a bonus, not the measurement.
        return {}
    return {
        name.removeprefix("cmdstat_"): int(stats["calls"])
        for name, stats in info.items()
        if isinstance(stats, dict)
    }


def _diff_counts(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    names = (n for n in after if n.partition("|")[0] not in ("info", "eval", "xgroup", "command"))
    diff = {n: after[n] - before.get(n, 0) for n in names}
    return {n: c for n, c in sorted(diff.items()) if c}
