"""Cancelling the task that runs ``listen()`` at every await point.

After any cancellation: ``CancelledError`` reaches the canceller, no task of the
consumer outlives it, no connection of streamq's stays open, the pending list is
consistent (everything whose handler finished is acked, everything else delivered
is still pending), ``aclose()`` is idempotent, and the borrowed client still works.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio
from conftest import MakeProxy
from helpers import FAST, add, group_info, make_consumer, pending, wait_group, wait_until

from streamq import AsyncConsumer, ConsumerState, Message, Result, fail, success
from streamq._servers import LocalRedis

pytestmark = pytest.mark.anyio

Client = redis.asyncio.Redis


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class Tracker:
    """What the handlers did: started, finished (success returned), and a gate."""

    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    fail_ids: set[str] = field(default_factory=set)

    async def handler(self, msg: Message) -> Result:
        self.started.append(msg.id)
        if msg.id in self.fail_ids:
            return fail("later", backoff=3600)
        await self.gate.wait()
        self.finished.append(msg.id)
        return success()


@pytest.fixture
async def named_client(redis_server: LocalRedis) -> AsyncIterator[Client]:
    """A borrowed client with a unique name, which streamq's own connections copy."""
    client = redis_server.client(client_name=f"cancel-{uuid.uuid4().hex[:8]}")
    try:
        await client.ping()
        yield client
    finally:
        await client.aclose()


def _ours(task: asyncio.Task[Any]) -> bool:
    # The fault proxy's own tasks are not the consumer's.
    return "FaultProxy" not in repr(task.get_coro())


async def _connections(client: Client) -> int:
    name = client.get_connection_kwargs()["client_name"]
    return sum(1 for c in await client.client_list() if c.get("name") == name)


async def check_invariants(
    client: Client,
    stream: str,
    consumer: AsyncConsumer,
    task: asyncio.Task[None],
    tracker: Tracker,
    tasks_before: set[asyncio.Task[Any]],
    *,
    count_connections: bool = True,
) -> None:
    with pytest.raises(asyncio.CancelledError):
        await task
    # NEW only when cancelled before listen() ever ran (then aclose() closes it).
    assert consumer.state in (ConsumerState.CLOSED, ConsumerState.NEW)
    await asyncio.wait_for(consumer.aclose(), 5)  # idempotent, returns at once
    await asyncio.wait_for(consumer.aclose(), 5)

    def leaked() -> set[asyncio.Task[Any]]:
        current = asyncio.current_task()
        return {t for t in asyncio.all_tasks() - tasks_before if t is not current and _ours(t)}

    await wait_until(lambda: not leaked(), timeout=5, what="no leaked tasks")

    # The borrowed client still works, and only its own connection is left.
    assert await client.ping()
    if count_connections:
        await wait_until(
            lambda: _equals(_connections(client), 1), timeout=5, what="streamq's connections closed"
        )

    info = await group_info(client, stream, "g")
    if info is None:
        assert tracker.started == []  # cancelled before the group existed
        return
    last = info["last-delivered-id"]
    last = last.decode() if isinstance(last, bytes) else last
    delivered = {
        (i.decode() if isinstance(i, bytes) else i)
        for i, _ in await client.xrange(stream)
        if _key(i.decode() if isinstance(i, bytes) else i) <= _key(last)
    }
    pel = {r["id"] for r in await pending(client, stream)}
    finished = set(tracker.finished)
    # Nothing finished is left pending, nothing unfinished was acked.
    assert pel == delivered - finished
    assert {r["consumer"] for r in await pending(client, stream)} <= {"c1"}


async def _equals(value: Any, expected: int) -> bool:
    return await value == expected


async def _start(client: Any, stream: str, tracker: Tracker, **kw: Any) -> tuple[Any, Any, Any]:
    tasks_before = set(asyncio.all_tasks())
    consumer = make_consumer(client, start_id="0", **kw)
    consumer.subscribe(stream, tracker.handler)
    task = asyncio.create_task(consumer.listen())
    return consumer, task, tasks_before


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 30, 40, 60])
async def test_cancel_after_n_loop_steps(
    named_client: Client, stream_name: str, steps: int
) -> None:
    """Start-up and the first reads: groups, recovery, the first XREADGROUP, handlers."""
    await add(named_client, stream_name, 6)
    tracker = Tracker()
    tracker.gate.set()
    consumer, task, before = await _start(named_client, stream_name, tracker, concurrency=2)
    for _ in range(steps):
        await asyncio.sleep(0)
    task.cancel()
    await check_invariants(named_client, stream_name, consumer, task, tracker, before)


async def test_cancel_during_recovery_of_own_pending(
    named_client: Client, stream_name: str
) -> None:
    await add(named_client, stream_name, 50)
    await named_client.xgroup_create(stream_name, "g", id="0")
    await named_client.xreadgroup("g", "c1", {stream_name: ">"}, count=40)
    tracker = Tracker()
    tracker.gate.set()
    consumer, task, before = await _start(named_client, stream_name, tracker, buffer_size=3)
    await wait_until(lambda: consumer.stats().recovered > 0, what="recovery started")
    task.cancel()
    await check_invariants(named_client, stream_name, consumer, task, tracker, before)


async def test_cancel_while_blocked_in_xreadgroup(named_client: Client, stream_name: str) -> None:
    tracker = Tracker()
    consumer, task, before = await _start(named_client, stream_name, tracker, read_timeout=0)
    await wait_group(named_client, stream_name)
    # The reader is parked in XREADGROUP BLOCK 0 on its own connection.
    await wait_until(lambda: _blocked(named_client), what="a blocked client")
    task.cancel()
    await check_invariants(named_client, stream_name, consumer, task, tracker, before)
    # The cancelled blocking read left nothing behind on the server.
    assert not await _blocked(named_client)


async def _blocked(client: Client) -> bool:
    name = client.get_connection_kwargs()["client_name"]
    return any(
        c.get("name") == name and c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "")
        for c in await client.client_list()
    )


async def test_cancel_while_handlers_run(named_client: Client, stream_name: str) -> None:
    await add(named_client, stream_name, 10)
    tracker = Tracker()
    consumer, task, before = await _start(
        named_client, stream_name, tracker, concurrency=3, buffer_size=2
    )
    await wait_until(lambda: len(tracker.started) == 3, what="3 handlers running")
    task.cancel()
    await check_invariants(named_client, stream_name, consumer, task, tracker, before)
    assert tracker.finished == []
    assert len(await pending(named_client, stream_name)) == 5  # 3 running + 2 buffered


async def test_cancel_after_some_handlers_finished(named_client: Client, stream_name: str) -> None:
    await add(named_client, stream_name, 30)
    tracker = Tracker()
    tracker.gate.set()

    async def slow_half(msg: Message) -> Result:
        if int(msg.text("n")) >= 15:
            await asyncio.sleep(3600)
        return await tracker.handler(msg)

    tasks_before = set(asyncio.all_tasks())
    consumer = make_consumer(named_client, start_id="0", concurrency=4)
    consumer.subscribe(stream_name, slow_half)
    task = asyncio.create_task(consumer.listen())
    await wait_until(lambda: len(tracker.finished) == 15, what="15 finished")
    task.cancel()
    await check_invariants(named_client, stream_name, consumer, task, tracker, tasks_before)
    # The last acks were flushed despite the cancellation.
    assert len(await pending(named_client, stream_name)) > 0
    assert not set(tracker.finished) & {r["id"] for r in await pending(named_client, stream_name)}


async def test_cancel_while_acks_are_in_flight(
    named_client: Client, stream_name: str, make_proxy: MakeProxy
) -> None:
    await add(named_client, stream_name, 300)
    proxy = await make_proxy()
    # Every round trip takes at least 2 x 20 ms: acks pile up behind the one on the wire.
    proxy.set_delay(0.02)
    tracker = Tracker()
    tracker.gate.set()
    name = named_client.get_connection_kwargs()["client_name"]
    url = proxy.url() + f"?client_name={name}"
    consumer, task, before = await _start(url, stream_name, tracker, concurrency=8)
    await wait_until(
        lambda: consumer.stats().acked > 0 and consumer.stats().pending_acks > 0,
        what="acks in flight",
    )
    task.cancel()
    await check_invariants(named_client, stream_name, consumer, task, tracker, before)
    assert tracker.finished


async def test_cancel_during_retry_wait(named_client: Client, stream_name: str) -> None:
    ids = await add(named_client, stream_name, 3)
    tracker = Tracker(fail_ids={ids[0]})
    tracker.gate.set()
    consumer, task, before = await _start(named_client, stream_name, tracker, backoff=FAST)
    await wait_until(lambda: consumer.stats().waiting_retry == 1 and len(tracker.finished) == 2)
    task.cancel()
    await check_invariants(named_client, stream_name, consumer, task, tracker, before)
    rows = await pending(named_client, stream_name)
    assert [(r["id"], r["deliveries"]) for r in rows] == [(ids[0], 1)]


async def test_cancel_the_task_inside_async_with(named_client: Client, stream_name: str) -> None:
    await add(named_client, stream_name, 5)
    tracker = Tracker()
    tasks_before = set(asyncio.all_tasks())
    consumer = make_consumer(named_client, start_id="0", concurrency=2)
    consumer.subscribe(stream_name, tracker.handler)
    entered = asyncio.Event()

    async def app() -> None:
        async with consumer:
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(app())
    await entered.wait()
    await wait_until(lambda: len(tracker.started) == 2)
    tracker.gate.set()  # the running handlers finish during the graceful close
    await wait_until(lambda: len(tracker.finished) >= 2)
    task.cancel()
    await check_invariants(named_client, stream_name, consumer, task, tracker, tasks_before)


async def test_cancel_aclose_caller(named_client: Client, stream_name: str) -> None:
    """Cancelling a task that waits in aclose() does not stop the shutdown half-way."""
    await add(named_client, stream_name, 2)
    tracker = Tracker()
    consumer, task, _before = await _start(named_client, stream_name, tracker)
    await wait_until(lambda: len(tracker.started) == 2)
    closer = asyncio.create_task(consumer.aclose())
    await wait_until(lambda: consumer.state is not ConsumerState.RUNNING)
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    tracker.gate.set()
    assert await asyncio.wait_for(task, 5) is None
    await consumer.aclose()
    # The handlers finished during the shutdown that went on, and were acked.
    assert sorted(tracker.finished) == sorted(tracker.started)
    assert await pending(named_client, stream_name) == []


async def test_many_cancellations_leave_a_usable_client(
    named_client: Client, stream_name: str
) -> None:
    """Repeated start/cancel cycles: the borrowed client's pool is never corrupted."""
    tracker = Tracker()
    tracker.gate.set()
    for round_ in range(5):
        await add(named_client, stream_name, 3)
        consumer, task, before = await _start(named_client, stream_name, tracker, read_timeout=0)
        await wait_until(lambda n=3 * (round_ + 1): len(tracker.finished) == n, timeout=5)
        task.cancel()
        await check_invariants(named_client, stream_name, consumer, task, tracker, before)
        # Replies on the borrowed client are still in step with its commands.
        assert await named_client.echo(f"round {round_}") == f"round {round_}".encode()
