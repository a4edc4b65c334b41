"""The proof of "nothing lost": one run with every fault at once, checked from Redis.

Three consumer processes and a publisher work through a fault proxy against a
Redis with an AOF (``appendfsync always``) while the test SIGKILLs and restarts
consumers, SIGKILLs and restarts Redis, resets and stalls connections, and feeds
poison messages (raising, hanging and process-killing handlers). Afterwards every
entry of the stream must have been handled successfully (the handlers' own records)
and acked (nothing pending), or be in the dead-letter stream; duplicates are
counted. The run lasts ``STREAMQ_SOAK_SECONDS`` (default 20) seconds of chaos;
``STREAMQ_SEED`` replays a run.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import MakeProxy, MakeServer
from faults.harness import (
    Worker,
    dead_letters,
    env_seconds,
    pending_count,
    stream_ids,
    wait_until,
)

from streamq import AsyncPublisher, Backoff, Message

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.slow]

STREAM = "orders"
POISON_EVERY = 97
POISONS = ("raise", "timeout", "exit")


async def test_nothing_lost_under_chaos(
    make_server: MakeServer, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    chaos_seconds = env_seconds("STREAMQ_SOAK_SECONDS", 20.0)
    seed = int(os.environ.get("STREAMQ_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    server = make_server(appendonly=True)
    proxy = await make_proxy(server)
    server.execute("XGROUP", "CREATE", STREAM, "g", "0", "MKSTREAM")
    workers = [Worker(tmp_path, f"w{i}", proxy.url(), [STREAM]).start() for i in range(3)]

    published: dict[str, int] = {}
    poison_ids: dict[str, str] = {}
    faults: Counter[str] = Counter()
    stop_chaos = asyncio.Event()
    stop_monitor = asyncio.Event()

    async def publish(publisher: AsyncPublisher) -> None:
        seq = 0
        while not stop_chaos.is_set():
            seq += 1
            values: dict[str, str | int] = {"seq": seq}
            kind = POISONS[(seq // POISON_EVERY) % 3] if seq % POISON_EVERY == 0 else None
            if kind is not None:
                values["poison"] = kind
            entry_id = await publisher.publish(Message(STREAM, values))
            published[entry_id] = seq
            if kind is not None:
                poison_ids[entry_id] = kind
            await asyncio.sleep(0.003)

    async def monitor() -> None:
        # Restarts consumers that died (SIGKILLed by the chaos, or by a poison
        # message), each after a random delay: sometimes past pending_timeout, so
        # that live consumers claim its entries, sometimes at once, so that it
        # recovers its own pending entries.
        dead_since: dict[str, tuple[float, float]] = {}
        while not stop_monitor.is_set():
            now = time.monotonic()
            for w in workers:
                if w.alive:
                    continue
                since, wait = dead_since.setdefault(w.name, (now, rng.uniform(0.0, 2.5)))
                if now - since >= wait or stop_chaos.is_set():
                    del dead_since[w.name]
                    w.start()
            await asyncio.sleep(0.05)

    async def restart_redis() -> None:
        faults["redis_restart"] += 1
        await asyncio.to_thread(server.restart, kill=True)

    async def chaos() -> None:
        end = time.monotonic() + chaos_seconds
        # Twice in a CI run, about every 10 s in a soak.
        restarts = max(2, int(chaos_seconds // 10))
        redis_at = {end - chaos_seconds * k / (restarts + 1) for k in range(1, restarts + 1)}
        while time.monotonic() < end:
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            due = {t for t in redis_at if time.monotonic() >= t}
            if due:
                redis_at -= due
                await restart_redis()
                continue
            action = rng.choice(("kill", "kill", "cut", "blackhole", "delay"))
            faults[action] += 1
            if action == "kill":
                rng.choice(workers).kill()
            elif action == "cut":
                proxy.cut()
            elif action == "blackhole":
                proxy.blackhole(True)
                await asyncio.sleep(rng.uniform(0.2, 1.5))
                proxy.blackhole(False)
            else:
                proxy.set_delay(0.02)
                await asyncio.sleep(rng.uniform(0.5, 1.5))
                proxy.set_delay(0)
        stop_chaos.set()

    started = time.monotonic()
    publisher = AsyncPublisher(
        redis=proxy.url(),
        backoff=Backoff(min=0.02, max=0.3),
        network_retry=-1,
        command_timeout=1.0,
    )
    try:
        async with publisher, asyncio.TaskGroup() as tg:
            tg.create_task(publish(publisher))
            tg.create_task(chaos())
            watcher = tg.create_task(monitor())

            everything_settled = _settled(server, workers)
            await stop_chaos.wait()
            await wait_until(everything_settled, 90, "every entry handled or dead-lettered")
            stop_monitor.set()
            await watcher
        for w in workers:
            assert await w.terminate() == 0, w.stderr()
    finally:
        for w in workers:
            w.kill()
    elapsed = time.monotonic() - started

    entries = stream_ids(server, STREAM)
    in_stream = set(entries)
    handled = Counter(i for w in workers for i in w.handled())
    dead = dead_letters(server, STREAM)
    dead_total = len(stream_ids(server, f"{STREAM}:dead"))

    missing = [i for i in published if i not in in_stream]
    lost = [i for i in entries if i not in handled and i not in dead]
    duplicates = sum(handled.values()) - len(handled) + dead_total - len(dead)
    collateral = [i for i in dead if i not in poison_ids]
    print(
        f"\nchaos {chaos_seconds:.0f} s (seed {seed}), total {elapsed:.1f} s; faults: "
        + ", ".join(f"{k}={v}" for k, v in sorted(faults.items()))
        + f"; consumer starts={sum(w.starts for w in workers)}"
        + f"; entries in stream={len(entries)} (publishes that returned an ID: {len(published)})"
        + f"; dead-lettered without being poison={len(collateral)}"
        + str(Counter(dead[i]["streamq-error"][:70] for i in collateral).most_common(3))
    )
    print(
        f"published={len(published)} handled={len(handled)} duplicates={duplicates} "
        f"dead_lettered={len(dead)} lost={len(lost)}"
    )

    assert not missing, f"publishes that returned an ID but are not in Redis: {missing[:10]}"
    assert not lost, f"entries neither handled nor dead-lettered: {lost[:10]}"
    assert pending_count(server, STREAM) == 0
    assert set(poison_ids) <= set(dead), "a poison message was not dead-lettered"
    assert not set(poison_ids) & set(handled), "a poison message was recorded as handled"
    for entry_id in poison_ids:
        # The last error: the handler's own, or "delivered N times without being
        # acknowledged" when crashes used up its deliveries first.
        assert dead[entry_id]["streamq-error"]


def _settled(server, workers):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        try:
            entries = stream_ids(server, STREAM)
            dead = dead_letters(server, STREAM)
            pending = pending_count(server, STREAM)
        except (OSError, ConnectionError):
            return False
        if pending:
            return False
        handled = {i for w in workers for i in w.handled()}
        return all(i in handled or i in dead for i in entries)

    return check
