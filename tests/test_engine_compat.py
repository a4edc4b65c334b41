"""Behaviour that differs between engines (Redis 6.2, Redis 7.0, Valkey 8.1).

These run on whichever engine the fixtures use (``STREAMQ_ENGINE``); the engine
matrix in ``test_engines.py`` runs them on every installed engine. Each test
asserts on what the server holds afterwards (XPENDING, XINFO), not only on what
the consumer reported.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from conftest import MakeServer
from helpers import add, drain_errors, make_consumer, pending_count, wait_until

from streamq import Message, MessageLostError, UnsupportedServerError, fail
from streamq._capabilities import (
    CONSUMER_COMMANDS,
    MIN_VERSION,
    Capabilities,
    capabilities_for,
    parse_server_info,
)
from streamq._servers import LocalRedis, ServerBinary
from streamq._transport import open_transport

pytestmark = pytest.mark.anyio


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _lost_ids(errors: list[Any]) -> list[str]:
    return sorted(e.entry_id for e in errors if isinstance(e, MessageLostError))


# -- detection ----------------------------------------------------------------------


def test_parse_info_of_each_engine() -> None:
    redis62 = parse_server_info(b"# Server\r\nredis_version:6.2.14\r\nredis_mode:standalone\r\n")
    assert (redis62.name, redis62.version, redis62.compat_version) == (
        "redis",
        (6, 2, 14),
        (6, 2, 14),
    )
    assert redis62.capabilities == Capabilities(claim_drops_deleted=False, group_lag=False)
    redis70 = parse_server_info("# Server\r\nredis_version:7.0.15\r\n")
    assert redis70.capabilities == Capabilities(claim_drops_deleted=True, group_lag=True)
    assert redis70.description == "Redis 7.0.15"
    # Valkey keeps redis_version at the Redis release it forked from: features come
    # from that, its own number is for people.
    valkey = parse_server_info(
        "# Server\r\nredis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:8.1.8\r\n"
    )
    assert (valkey.name, valkey.version, valkey.compat_version) == ("valkey", (8, 1, 8), (7, 2, 4))
    assert valkey.description == "Valkey 8.1.8 (Redis 7.2.4 compatible)"
    assert valkey.capabilities == capabilities_for((7, 2, 4))


async def test_detected_server_matches_the_binary(
    redis_server: LocalRedis, server_binary: ServerBinary
) -> None:
    transport = open_transport(redis_server.url, 5.0)
    try:
        info = await transport.server_info(CONSUMER_COMMANDS)
    finally:
        await transport.aclose()
    assert info.name == server_binary.server_name
    assert info.version == server_binary.version
    assert info.compat_version >= MIN_VERSION


async def test_capability_flags_match_what_the_server_does(
    redis_client: redis.asyncio.Redis, redis_server: LocalRedis, stream_name: str
) -> None:
    """Each flag is checked against the real server, so no engine's flags can drift."""
    transport = open_transport(redis_server.url, 5.0)
    try:
        caps = (await transport.server_info()).capabilities
    finally:
        await transport.aclose()
    ids = await add(redis_client, stream_name, 2)
    await redis_client.xgroup_create(stream_name, "g", "0")
    await redis_client.xreadgroup("g", "ghost", {stream_name: ">"})
    await redis_client.xdel(stream_name, ids[0])
    await redis_client.execute_command("XCLAIM", stream_name, "g", "c1", 0, *ids)
    # 6.2 claims the hole too (and answers nil for it); 7.0+ drops it from the PEL.
    assert await pending_count(redis_client, stream_name) == (1 if caps.claim_drops_deleted else 2)
    (group,) = await redis_client.xinfo_groups(stream_name)
    assert ("lag" in group and "entries-read" in group) == caps.group_lag


class _FakeOldServer:
    """A TCP server that speaks just enough RESP to claim to be ``redis_version``.

    No real pre-6.2 binary is available here, so this simulates one: INFO answers
    with the given version, every other command with +OK.
    """

    def __init__(self, version: str) -> None:
        self.version = version
        self.commands: list[list[bytes]] = []
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if not line.startswith(b"*"):
                    continue
                args = []
                for _ in range(int(line[1:])):
                    size = int((await reader.readline())[1:])
                    args.append((await reader.readexactly(size + 2))[:-2])
                self.commands.append(args)
                if args[0].upper() == b"INFO":
                    body = f"# Server\r\nredis_version:{self.version}\r\n".encode()
                    writer.write(b"$%d\r\n%s\r\n" % (len(body), body))
                else:
                    writer.write(b"+OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[_FakeOldServer]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            await server.wait_closed()


async def test_server_older_than_6_2_is_refused_at_start_simulated_by_fake_info() -> None:
    async with _FakeOldServer("6.0.0").running() as fake:
        consumer = make_consumer(f"redis://127.0.0.1:{fake.port}/0", network_retry=0)
        consumer.subscribe("orders", _never_called)
        with pytest.raises(UnsupportedServerError, match=r"Redis 6\.0\.0 is too old.*>= 6\.2"):
            await asyncio.wait_for(consumer.listen(), 10)
    sent = [cmd[0].upper() for cmd in fake.commands]
    assert b"INFO" in sent
    # Refused before creating a group or reading anything.
    assert not {b"XGROUP", b"XREADGROUP"} & set(sent)


async def test_renamed_away_command_is_refused_at_start(
    make_server: MakeServer, stream_name: str
) -> None:
    server = make_server(extra_args=["--rename-command", "XCLAIM", ""])
    consumer = make_consumer(server.url, network_retry=0)
    consumer.subscribe(stream_name, _never_called)
    with pytest.raises(UnsupportedServerError, match=r"does not know XCLAIM"):
        await asyncio.wait_for(consumer.listen(), 10)
    client = server.client()
    try:
        assert await client.exists(stream_name) == 0
    finally:
        await client.aclose()


async def _never_called(msg: Message) -> None:
    raise AssertionError(f"handler called with {msg}")


# -- deleted pending entries: 6.2 answers nil and keeps them, 7.0+ drops them ----------


async def test_claimer_reports_and_clears_trimmed_pending_entries(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    ids = await add(redis_client, stream_name, 3)
    await redis_client.xgroup_create(stream_name, "g", "0")
    # A consumer that read everything and died; then two of its entries were trimmed.
    await redis_client.xreadgroup("g", "ghost", {stream_name: ">"})
    await redis_client.xdel(stream_name, ids[0], ids[2])
    handled: list[str] = []

    async def handler(msg: Message) -> None:
        handled.append(msg.id)

    consumer = make_consumer(
        redis_client, pending_timeout=0.2, claim_interval=0.05, handler_timeout=0.1
    )
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(
            lambda: consumer.stats().lost == 2 and handled == [ids[1]], what="claim of all three"
        )
        await wait_until(
            lambda: _pel_empty(redis_client, stream_name), what="an empty pending list"
        )
    assert _lost_ids(drain_errors(consumer)) == sorted([ids[0], ids[2]])
    assert await pending_count(redis_client, stream_name) == 0


async def test_retry_of_a_trimmed_entry_reports_it_lost(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    (entry_id,) = await add(redis_client, stream_name, 1)
    await redis_client.xgroup_create(stream_name, "g", "0")
    calls: list[str] = []

    async def handler(msg: Message) -> Any:
        calls.append(msg.id)
        # Trimmed while waiting for its retry: the retrier's XCLAIM meets a hole.
        await redis_client.xdel(stream_name, msg.id)
        return fail("try again", backoff=0.05)

    consumer = make_consumer(redis_client, start_id="0")
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().lost == 1, what="the retry to find it gone")
        await wait_until(lambda: _pel_empty(redis_client, stream_name), what="an empty PEL")
    assert calls == [entry_id]
    assert _lost_ids(drain_errors(consumer)) == [entry_id]


async def test_restart_reports_trimmed_own_pending_entries(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    ids = await add(redis_client, stream_name, 3)
    await redis_client.xgroup_create(stream_name, "g", "0")
    # This consumer's previous life read everything and crashed; the stream was trimmed.
    await redis_client.xreadgroup("g", "c1", {stream_name: ">"})
    await redis_client.xtrim(stream_name, maxlen=0)
    consumer = make_consumer(redis_client)
    consumer.subscribe(stream_name, _never_called)
    async with consumer:
        await wait_until(lambda: consumer.stats().lost == 3, what="recovery of three holes")
        await wait_until(lambda: _pel_empty(redis_client, stream_name), what="an empty PEL")
    assert _lost_ids(drain_errors(consumer)) == sorted(ids)


async def _pel_empty(client: redis.asyncio.Redis, stream: str) -> bool:
    return await pending_count(client, stream) == 0
