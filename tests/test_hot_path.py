"""Guarantees of the optimised paths: batched retries, draining reads, silent logging.

These pin down what the performance work in benchmarks/ relies on, so that a
later change cannot quietly bring back per-message round trips.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis.asyncio
from helpers import add, drain_errors, make_consumer, pending_count, wait_until

from streamq import Backoff, HandlerError, Message, fail
from streamq._errorstream import _listened

pytestmark = pytest.mark.anyio

Client = redis.asyncio.Redis


async def _calls(client: Client, command: str) -> int:
    stats: dict[str, Any] = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_retries_falling_due_together_share_an_xclaim(
    redis_client: Client, stream_name: str
) -> None:
    await add(redis_client, stream_name, 20)
    deliveries: dict[str, list[int]] = {}

    async def handler(msg: Message) -> Any:
        deliveries.setdefault(msg.text("n"), []).append(msg.deliveries)
        if msg.deliveries == 1:
            return fail("once", backoff=0.01)
        return None

    consumer = make_consumer(redis_client, start_id="0", concurrency=20)
    consumer.subscribe(stream_name, handler)
    before = await _calls(redis_client, "xclaim")
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 20, what="20 acks")
    claims = await _calls(redis_client, "xclaim") - before
    # One XCLAIM per retry would be 20; they fail together, so they come back together.
    assert claims <= 5
    assert deliveries == {str(i): [1, 2] for i in range(20)}
    assert await pending_count(redis_client, stream_name) == 0
    assert all(isinstance(e, HandlerError) and e.retrying for e in drain_errors(consumer))


async def test_a_backlog_is_read_in_reads_of_the_whole_capacity(
    redis_client: Client, stream_name: str
) -> None:
    # buffer_size + concurrency = 50: 500 entries with fast handlers take about ten
    # reads, not twenty (reads sized while the last batch still sat in the queue).
    await add(redis_client, stream_name, 500)

    async def handler(msg: Message) -> None:
        return None

    consumer = make_consumer(
        redis_client, start_id="0", concurrency=10, buffer_size=40, backoff=Backoff()
    )
    consumer.subscribe(stream_name, handler)
    before = await _calls(redis_client, "xreadgroup")
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 500, what="500 acks")
    reads = await _calls(redis_client, "xreadgroup") - before
    assert reads <= 16
    assert await pending_count(redis_client, stream_name) == 0


def test_records_are_skipped_only_when_no_handler_would_emit_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    streamq_logger = logging.getLogger("streamq")
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(streamq_logger, "handlers", [logging.NullHandler()])
    assert not _listened()
    monkeypatch.setattr(root, "handlers", [logging.StreamHandler()])
    assert _listened()
    monkeypatch.setattr(streamq_logger, "propagate", False)
    assert not _listened()
    monkeypatch.setattr(streamq_logger, "handlers", [logging.StreamHandler()])
    assert _listened()
