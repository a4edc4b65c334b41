"""Waiting for conditions in tests: poll with a deadline, never sleep a fixed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

from .._consumer import AsyncConsumer, ConsumerState, ConsumerStats

__all__ = ["consume_until", "wait_until"]

Condition = Callable[[], "bool | Awaitable[bool]"]
StatsCondition = Callable[[ConsumerStats], "bool | Awaitable[bool]"]


async def _holds(value: bool | Awaitable[bool]) -> bool:
    if inspect.isawaitable(value):
        value = await value
    return bool(value)


async def wait_until(
    condition: Condition,
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - a test helper's deadline, named as users expect
    interval: float = 0.01,
    message: str | None = None,
) -> None:
    """Poll ``condition()`` (a bool, or an awaitable bool) until it is true.

    Args:
        condition: Checked every ``interval`` seconds; may be ``async``.
        timeout: Seconds to wait at most.
        interval: Seconds between checks.
        message: Text for the error when the deadline passes.

    Raises:
        TimeoutError: The condition did not hold within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not await _holds(condition()):
        if time.monotonic() >= deadline:
            raise TimeoutError(message or f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def consume_until(
    consumer: AsyncConsumer,
    condition: StatsCondition,
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - a test helper's deadline, named as users expect
    interval: float = 0.01,
) -> ConsumerStats:
    """Run ``consumer`` until ``condition(consumer.stats())`` holds, then close it.

    A consumer that was not started yet is started here and closed gracefully
    (acks flushed) before returning; one that is already running is left running.
    The condition receives the consumer's statistics and may ignore them (e.g.
    ``lambda _: len(seen) == 3``); it may be ``async``, for instance to look at
    what Redis holds.

    Args:
        consumer: The consumer, with its subscriptions made.
        condition: Checked every ``interval`` seconds.
        timeout: Seconds to wait at most.
        interval: Seconds between checks.

    Returns:
        The consumer's statistics once the condition held (after closing, if
        this function started it).

    Raises:
        TimeoutError: The condition did not hold in time; the message includes the
            consumer's statistics.
        StreamqError: The consumer stopped with a fatal error (re-raised).
        RuntimeError: The consumer stopped without an error before the condition held.
    """
    if consumer.state is not ConsumerState.NEW:
        await _poll(consumer, condition, timeout, interval)
        return consumer.stats()
    async with consumer:
        await _poll(consumer, condition, timeout, interval)
    return consumer.stats()


async def _poll(
    consumer: AsyncConsumer, condition: StatsCondition, limit: float, interval: float
) -> None:
    deadline = time.monotonic() + limit
    while True:
        stats = consumer.stats()
        if await _holds(condition(stats)):
            return
        if consumer.state in (ConsumerState.CLOSING, ConsumerState.CLOSED):
            # Leaving the `async with` re-raises the consumer's fatal error, if any.
            await consumer.aclose()
            raise RuntimeError(f"the consumer stopped before the condition held: {stats}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {limit} s; consumer statistics: {stats}")
        await asyncio.sleep(interval)
