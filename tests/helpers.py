"""Small helpers shared by the streamq tests: polling with a deadline, Redis inspection."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio

from streamq import AsyncConsumer, Backoff, ConsumerOptions, StreamqError

T = TypeVar("T")

# Fast enough that retries do not slow the suite, slow enough to be observable.
FAST = Backoff(min=0.01, max=0.05)


async def wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` (sync or async) until it returns something truthy.

    Raises:
        AssertionError: The deadline passed first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


def consumer_options(client: Any, group: str = "g", consumer: str = "c1", **kw: Any) -> Any:
    """ConsumerOptions with a fast backoff, for tests."""
    kw.setdefault("backoff", FAST)
    return ConsumerOptions(redis=client, group=group, consumer=consumer, **kw)


def make_consumer(client: Any, group: str = "g", consumer: str = "c1", **kw: Any) -> AsyncConsumer:
    """An AsyncConsumer with a fast backoff, for tests."""
    return AsyncConsumer(consumer_options(client, group, consumer, **kw))


async def group_info(client: redis.asyncio.Redis, stream: str, group: str) -> dict[str, Any] | None:
    """``XINFO GROUPS`` row of ``group`` (keys decoded), or ``None``."""
    try:
        rows = await client.xinfo_groups(stream)
    except redis.ResponseError:
        return None
    for row in rows:
        name = row["name"]
        if (name.decode() if isinstance(name, bytes) else name) == group:
            return row
    return None


async def wait_group(client: redis.asyncio.Redis, stream: str, group: str = "g") -> None:
    """Wait until ``group`` exists on ``stream`` (the consumer created it)."""
    await wait_until(lambda: group_info(client, stream, group), what=f"group {group} on {stream}")


async def pending(
    client: redis.asyncio.Redis, stream: str, group: str = "g", consumer: str | None = None
) -> list[dict[str, Any]]:
    """Detailed ``XPENDING`` rows (id, consumer, idle, times_delivered), IDs decoded."""
    kwargs: dict[str, Any] = {}
    if consumer is not None:
        kwargs["consumername"] = consumer
    rows = await client.xpending_range(stream, group, "-", "+", 10_000, **kwargs)
    out = []
    for row in rows:
        out.append(
            {
                "id": _text(row["message_id"]),
                "consumer": _text(row["consumer"]),
                "idle": row["time_since_delivered"],
                "deliveries": row["times_delivered"],
            }
        )
    return out


async def pending_count(client: redis.asyncio.Redis, stream: str, group: str = "g") -> int:
    """How many entries ``group`` has pending on ``stream``."""
    return int((await client.xpending(stream, group))["pending"])


async def add(client: redis.asyncio.Redis, stream: str, n: int, **extra: Any) -> list[str]:
    """Append ``n`` entries ``{"n": i, **extra}`` directly with redis-py; returns IDs."""
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(stream, {"n": i, **extra})
    return [_text(x) for x in await pipe.execute()]


def drain_errors(consumer_or_publisher: Any) -> list[StreamqError]:
    """Everything buffered in ``errors()`` right now, without waiting."""
    stream = consumer_or_publisher.errors()
    out = []
    while (err := stream.get_nowait()) is not None:
        out.append(err)
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
