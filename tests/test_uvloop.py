"""streamq on uvloop (the ``uvloop`` extra): the consumer's timers work on its loop too.

Skipped when uvloop is not installed. Each test runs its own uvloop event loop.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio
from helpers import add, drain_errors, make_consumer, pending_count, wait_until

from streamq import HandlerError, Message
from streamq._servers import LocalRedis

uvloop = pytest.importorskip("uvloop")


def test_handler_timeout_fires_and_work_completes_on_uvloop(
    redis_server: LocalRedis, key_prefix: str
) -> None:
    stream = f"{key_prefix}stream"

    async def scenario() -> tuple[list[int], list[object], int]:
        client: redis.asyncio.Redis = redis_server.client()
        try:
            await add(client, stream, 2)
            deliveries: list[int] = []

            async def handler(msg: Message) -> None:
                deliveries.append(msg.deliveries)
                if msg.text("n") == "0" and msg.deliveries == 1:
                    await asyncio.sleep(3600)  # cut by handler_timeout

            consumer = make_consumer(client, start_id="0", handler_timeout=0.05)
            consumer.subscribe(stream, handler)
            async with consumer:
                await wait_until(lambda: consumer.stats().acked == 2, what="2 acks")
            return deliveries, list(drain_errors(consumer)), await pending_count(client, stream)
        finally:
            await client.aclose()

    deliveries, errors, pending = uvloop.run(scenario())
    assert sorted(deliveries) == [1, 1, 2]
    [err] = errors
    assert type(err) is HandlerError
    assert isinstance(err.error, TimeoutError)
    assert pending == 0
