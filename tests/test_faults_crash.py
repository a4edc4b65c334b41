"""Consumer processes SIGKILLed at any moment lose nothing.

The consumer runs in a child process (``faults/worker.py``) that records what its
handler finished; the test kills it with SIGKILL, at random moments or while it
holds pending entries, and checks from Redis (XPENDING) and the records that every
entry is handled and acked: by the restarted process under the same name, or by
a live consumer that claims it after ``pending_timeout``.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from faults.harness import Worker, dead_letters, pending_by_consumer, pending_count, wait_until

from streamq import AsyncConsumer, Backoff, Message, MessageLostError
from streamq._servers import LocalRedis

pytestmark = [pytest.mark.anyio, pytest.mark.faults]


def _publish(server: LocalRedis, stream: str, n: int) -> list[str]:
    return [str(server.execute("XADD", stream, "*", "n", str(i))) for i in range(n)]


def _group(server: LocalRedis, stream: str) -> None:
    server.execute("XGROUP", "CREATE", stream, "g", "0", "MKSTREAM")


async def test_killed_at_random_moments_and_restarted_loses_nothing(
    redis_server: LocalRedis, stream_name: str, tmp_path: Path
) -> None:
    _group(redis_server, stream_name)
    ids = _publish(redis_server, stream_name, 400)
    # Claiming off: only the restart under the same name can bring entries back.
    # Retries unlimited: these kills come from outside, and a consumer cannot tell
    # them from a message killing its process; after max_retry + 1 kills during its
    # handler an innocent message would rightly be dead-lettered (poison messages
    # that kill the process are tested in test_faults_poison.py).
    options = {"claim_interval": 0, "max_retry": -1}
    worker = Worker(tmp_path, "w0", redis_server.url, [stream_name], options=options, delay=0.02)
    rng = random.Random(7)
    worker.start()
    for _ in range(6):
        await asyncio.sleep(rng.uniform(0.2, 0.6))
        worker.kill()
        worker.start()

    async def done() -> bool:
        return set(worker.handled()) >= set(ids) and pending_count(redis_server, stream_name) == 0

    await wait_until(done, 30, "all handled and acked after the restarts")
    assert await worker.terminate() == 0, worker.stderr()
    assert set(worker.handled()) == set(ids)
    assert worker.kills == 6


async def test_pending_entries_of_a_killed_consumer_are_reprocessed_on_restart(
    redis_server: LocalRedis, stream_name: str, tmp_path: Path
) -> None:
    _group(redis_server, stream_name)
    ids = _publish(redis_server, stream_name, 20)
    # A slow handler: the process dies holding read-but-unacked entries.
    options = {"claim_interval": 0, "handler_timeout": 0}
    worker = Worker(tmp_path, "w0", redis_server.url, [stream_name], options=options, delay=0.3)
    worker.start()

    async def holds_pending() -> bool:
        return len(pending_by_consumer(redis_server, stream_name).get("w0", [])) >= 5

    await wait_until(holds_pending, 10, "w0 holds pending entries")
    worker.kill()
    held = pending_by_consumer(redis_server, stream_name)["w0"]
    worker.config["delay"] = 0.0
    worker.start()

    async def done() -> bool:
        return set(worker.handled()) >= set(ids) and pending_count(redis_server, stream_name) == 0

    await wait_until(done, 15, "the restarted w0 handled everything")
    assert await worker.terminate() == 0, worker.stderr()
    assert set(held) <= set(worker.handled())


async def test_a_live_consumer_claims_a_dead_ones_entries_after_pending_timeout(
    redis_server: LocalRedis, stream_name: str, tmp_path: Path
) -> None:
    _group(redis_server, stream_name)
    ids = _publish(redis_server, stream_name, 30)
    options = {"handler_timeout": 0}
    dead = Worker(tmp_path, "dead", redis_server.url, [stream_name], options=options, delay=0.5)
    dead.start()

    async def holds_pending() -> bool:
        return len(pending_by_consumer(redis_server, stream_name).get("dead", [])) >= 5

    await wait_until(holds_pending, 10, "the doomed worker holds pending entries")
    dead.kill()
    orphans = pending_by_consumer(redis_server, stream_name)["dead"]
    live = Worker(tmp_path, "live", redis_server.url, [stream_name]).start()

    async def done() -> bool:
        return set(live.handled()) | set(dead.handled()) >= set(ids) and (
            pending_count(redis_server, stream_name) == 0
        )

    await wait_until(done, 15, "the live worker claimed and handled the orphans")
    assert await live.terminate() == 0, live.stderr()
    assert set(orphans) <= set(live.handled())
    assert pending_by_consumer(redis_server, stream_name) == {}


async def test_entries_trimmed_while_their_consumer_was_dead_are_reported_once(
    redis_server: LocalRedis, stream_name: str, tmp_path: Path
) -> None:
    """Both recovery paths (own restart and claim) report MessageLostError and clean the PEL."""
    _group(redis_server, stream_name)
    _publish(redis_server, stream_name, 12)
    options = {"handler_timeout": 0, "claim_interval": 0}
    for name in ("a", "b"):
        # Each one reads part of the stream and dies with it pending.
        doomed = Worker(tmp_path, name, redis_server.url, [stream_name], options=options, delay=60)
        doomed.start()

        async def holds(name: str = name) -> bool:
            return len(pending_by_consumer(redis_server, stream_name).get(name, [])) >= 4

        await wait_until(holds, 10, f"{name} holds pending entries")
        doomed.kill()
    before = pending_by_consumer(redis_server, stream_name)
    redis_server.execute("XTRIM", stream_name, "MAXLEN", "0")

    lost: list[MessageLostError] = []
    handled: list[str] = []

    async def handler(msg: Message) -> None:
        handled.append(msg.id)

    # "a" comes back under its own name (recovery path) and also claims b's (claim path).
    consumer = AsyncConsumer(
        redis=redis_server.url,
        group="g",
        consumer="a",
        pending_timeout=0.2,
        handler_timeout=0,
        claim_interval=0.05,
        backoff=Backoff(min=0.01, max=0.05),
    )
    consumer.subscribe(stream_name, handler)

    async def collect() -> None:
        async for err in consumer.errors():
            if isinstance(err, MessageLostError):
                lost.append(err)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(collect())
        async with consumer:

            async def clean() -> bool:
                return pending_count(redis_server, stream_name) == 0

            await wait_until(clean, 10, "the PEL is empty")
            # Many claim rounds later: still reported once each (no loop).
            await asyncio.sleep(0.5)
            assert consumer.stats().lost == len(before["a"]) + len(before["b"])
            assert consumer.stats().claimed <= len(before["b"])
    assert handled == []
    assert sorted(e.entry_id for e in lost) == sorted(before["a"] + before["b"])


async def test_a_live_consumers_running_buffered_and_retrying_entries_are_not_claimed(
    redis_server: LocalRedis, stream_name: str, tmp_path: Path
) -> None:
    """Between processes: the holder renews what it holds, the claimer takes none of it."""
    _group(redis_server, stream_name)
    poison = str(redis_server.execute("XADD", stream_name, "*", "poison", "raise"))
    ids = _publish(redis_server, stream_name, 4)
    timing = {"pending_timeout": 0.6, "handler_timeout": 0, "claim_interval": 0.1}
    # Each handler call outlives pending_timeout; the others wait in the buffer; the
    # poison waits in the retry timer (1 s backoff) between its two runs.
    holder = Worker(
        tmp_path,
        "holder",
        redis_server.url,
        [stream_name],
        options={**timing, "concurrency": 1, "max_retry": 1, "backoff": {"min": 1.0, "max": 1.0}},
        delay=0.8,
    ).start()

    async def holding() -> bool:
        return len(pending_by_consumer(redis_server, stream_name).get("holder", [])) == 5

    await wait_until(holding, 10, "the holder holds everything")
    thief = Worker(tmp_path, "thief", redis_server.url, [stream_name], options=timing).start()

    async def done() -> bool:
        return set(holder.handled()) == set(ids) and pending_count(redis_server, stream_name) == 0

    await wait_until(done, 20, "the holder handled everything")
    assert thief.handled() == []
    letters = dead_letters(redis_server, stream_name)
    # Run twice by the holder (the retry waited 1 s, longer than pending_timeout).
    assert letters[poison]["streamq-consumer"] == "holder"
    assert letters[poison]["streamq-deliveries"] == "2"
    for worker in (holder, thief):
        assert await worker.terminate() == 0, worker.stderr()
