"""The transport's own connection reuse (see ``Transport._round_trip``).

streamq keeps a free list of connections instead of redis-py's pool; these tests
check what the pool used to guarantee: a connection the server closed while idle
is replaced without the command failing, and a failed exchange never hands a
half-read connection to the next command.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio

from streamq._servers import LocalRedis
from streamq._transport import Transport, open_transport

pytestmark = pytest.mark.anyio


async def _kill_named(admin: redis.asyncio.Redis, name: str) -> int:
    killed = 0
    for client in await admin.client_list():
        if client.get("name") == name:
            await admin.client_kill_filter(_id=client["id"])
            killed += 1
    return killed


async def _open_connections(transport: Transport, n: int) -> None:
    # Commands in flight at once each take a connection of their own.
    await asyncio.gather(*(transport.execute("PING") for _ in range(n)))


async def test_idle_connections_the_server_closed_are_replaced_silently(
    redis_server: LocalRedis, redis_client: redis.asyncio.Redis
) -> None:
    client = redis_server.client(client_name="streamq-reuse-test")
    transport = open_transport(client, command_timeout=5.0)
    try:
        await _open_connections(transport, 4)
        assert await _kill_named(redis_client, "streamq-reuse-test") >= 4
        await asyncio.sleep(0.05)  # let the loop see the connections close
        for _ in range(6):
            assert await transport.execute("PING") == b"PONG"
    finally:
        await transport.aclose()
        await client.aclose()


async def test_after_a_failed_exchange_idle_connections_are_not_trusted(
    redis_server: LocalRedis, redis_client: redis.asyncio.Redis
) -> None:
    # Killed without the loop having seen it yet (no pause): the first command may
    # fail, but only once: the other idle connections are dropped with it.
    client = redis_server.client(client_name="streamq-reuse-test-2")
    transport = open_transport(client, command_timeout=5.0)
    try:
        await _open_connections(transport, 4)
        await _kill_named(redis_client, "streamq-reuse-test-2")
        failures = 0
        for _ in range(6):
            try:
                assert await transport.execute("PING") == b"PONG"
            except (redis.ConnectionError, ConnectionError):
                failures += 1
        assert failures <= 1
    finally:
        await transport.aclose()
        await client.aclose()


async def test_commands_in_flight_at_once_share_a_bounded_set_of_connections(
    redis_server: LocalRedis, redis_client: redis.asyncio.Redis, key_prefix: str
) -> None:
    name = "streamq-reuse-test-3"
    client = redis_server.client(client_name=name)
    transport = open_transport(client, command_timeout=5.0)

    async def connections() -> int:
        return sum(c.get("name") == name for c in await redis_client.client_list())

    try:
        # 200 commands that each hold their connection for 50 ms.
        burst = asyncio.gather(
            *(transport.execute("BLPOP", f"{key_prefix}none", "0.05") for _ in range(200))
        )
        peak = 0
        while not burst.done():
            peak = max(peak, await connections())
            await asyncio.sleep(0.01)
        assert await burst == [None] * 200
        assert 0 < peak <= 64
        assert await connections() <= 16  # the rest closed as they came back
    finally:
        await transport.aclose()
        await client.aclose()


async def test_an_idle_blocking_read_is_not_cut_by_a_small_command_timeout(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    # Redis answers a timed-out BLOCK on its next timer tick (up to 1/hz = 100 ms
    # late): the read's deadline keeps at least 1 s of slack beyond its block time,
    # whatever command_timeout is.
    await redis_client.xgroup_create(stream_name, "g", id="$", mkstream=True)
    transport = open_transport(redis_client, command_timeout=0.01)
    try:
        args = ["XREADGROUP", "GROUP", "g", "c", "COUNT", 1, "BLOCK", 100, "STREAMS"]
        for _ in range(5):
            assert await transport.blocking([*args, stream_name, ">"], 0.1) is None
    finally:
        await transport.aclose()
