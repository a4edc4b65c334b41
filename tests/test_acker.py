"""The ack coalescer: what it counts and what it sends, checked against Redis' PEL."""

from __future__ import annotations

import pytest
import redis.asyncio
from helpers import add, pending

from streamq import Backoff, StreamqError
from streamq._acker import Acker
from streamq._retry import NetworkRetry
from streamq._transport import open_transport

Client = redis.asyncio.Redis

pytestmark = pytest.mark.anyio


async def _read_all(client: Client, stream: str) -> None:
    await client.xgroup_create(stream, "g", id="0")
    await client.xreadgroup("g", "c1", {stream: ">"})


async def test_acks_confirmed_by_redis_count_even_when_no_longer_pending(
    redis_client: Client, stream_name: str
) -> None:
    # An ack whose reply was lost (a cancelled flush, a cut connection) is resent;
    # Redis then answers 0 for entries the first attempt already removed. Those acks
    # did happen and must count once, not vanish from the stats.
    ids = await add(redis_client, stream_name, 4)
    await _read_all(redis_client, stream_name)
    await redis_client.xack(stream_name, "g", ids[0], ids[1])  # "the first attempt"
    errors: list[StreamqError] = []
    transport = open_transport(redis_client, command_timeout=5.0)
    try:
        acker = Acker(transport, "g", NetworkRetry(Backoff(), 0, errors.append), errors.append)
        for entry_id in ids:
            acker.add(stream_name, entry_id)
        assert acker.pending == 4
        await acker.flush()
    finally:
        await transport.aclose()
    assert (acker.acked, acker.pending, errors) == (4, 0, [])
    assert await pending(redis_client, stream_name) == []


async def _xack_calls(client: Client) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_xack", {}).get("calls", 0))


async def test_a_batch_is_one_round_trip_of_chunked_xacks(
    redis_client: Client, stream_name: str
) -> None:
    ids = await add(redis_client, stream_name, 2500)
    await _read_all(redis_client, stream_name)
    errors: list[StreamqError] = []
    transport = open_transport(redis_client, command_timeout=5.0)
    before = await _xack_calls(redis_client)
    try:
        acker = Acker(transport, "g", NetworkRetry(Backoff(), 0, errors.append), errors.append)
        for entry_id in ids:
            acker.add(stream_name, entry_id)
        await acker.flush()
        await acker.wait_idle()
    finally:
        await transport.aclose()
    # 2,500 IDs go out as three XACKs of at most 1,000 IDs each.
    assert await _xack_calls(redis_client) - before == 3
    assert (acker.acked, acker.pending, errors) == (2500, 0, [])
    assert await pending(redis_client, stream_name) == []
