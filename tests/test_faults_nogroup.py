"""The consumer group or the whole stream deleted under a running consumer (NOGROUP).

The consumer recreates the group, reports GroupRecreatedError and carries on: no
crash, no hot loop, and every entry published after the deletion is handled.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from faults.harness import consumer_seen, pending_count, wait_until

from streamq import (
    AsyncConsumer,
    AsyncPublisher,
    Backoff,
    ConsumerState,
    GroupRecreatedError,
    Message,
    StreamqError,
)
from streamq._servers import LocalRedis

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

FAST = Backoff(min=0.01, max=0.1)


@pytest.mark.parametrize("deletion", ["group", "stream"])
async def test_deleted_group_or_stream_is_recreated_and_nothing_after_is_lost(
    redis_server: LocalRedis, stream_name: str, deletion: str
) -> None:
    handled: Counter[str] = Counter()

    async def handler(msg: Message) -> None:
        handled[msg.id] += 1

    consumers = [
        AsyncConsumer(
            redis=redis_server.url,
            group="g",
            consumer=name,
            start_id="0",
            read_timeout=0.2,
            claim_interval=0.1,
            backoff=FAST,
        )
        for name in ("c1", "c2")
    ]
    for consumer in consumers:
        consumer.subscribe(stream_name, handler)
    errors: list[StreamqError] = []

    async def collect(consumer: AsyncConsumer) -> None:
        async for err in consumer.errors():
            errors.append(err)

    after: list[str] = []
    async with (
        AsyncPublisher(redis=redis_server.url, backoff=FAST) as publisher,
        asyncio.TaskGroup() as tg,
    ):
        for consumer in consumers:
            tg.create_task(collect(consumer))
        async with consumers[0], consumers[1]:
            for name in ("c1", "c2"):
                await wait_until(consumer_seen(redis_server, stream_name, name), 5, name)
            for round_ in range(3):
                for i in range(30):
                    await publisher.publish(Message(stream_name, {"r": round_, "i": i}))
                if deletion == "group":
                    redis_server.execute("XGROUP", "DESTROY", stream_name, "g")
                else:
                    redis_server.execute("DEL", stream_name)
                for i in range(30):
                    after.append(await publisher.publish(Message(stream_name, {"after": i})))
                    await asyncio.sleep(0.002)

            async def done() -> bool:
                return set(after) <= set(handled) and pending_count(redis_server, stream_name) == 0

            await wait_until(done, 15, "everything published after the deletions handled")
            assert all(c.state is ConsumerState.RUNNING for c in consumers)
    recreated = [e for e in errors if isinstance(e, GroupRecreatedError)]
    assert recreated, "the recreation was not reported"
    # At most one report per deletion and consumer: recreating does not loop.
    assert len(recreated) <= 3 * len(consumers)
    assert "recreated at" in str(recreated[0])
