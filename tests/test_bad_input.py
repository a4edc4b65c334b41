"""Hostile input: entries streamq did not write, garbage values, huge values, invalid
options, keys of the wrong type, and servers that are not Redis at all.

Each gets a clear error; the consumer skips-and-reports (dead-letters) or stops with
a fatal error, never losing silently and never spinning in a hot loop.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from faults.harness import group_caught_up, wait_until

from streamq import (
    AsyncConsumer,
    AsyncPublisher,
    Backoff,
    ConsumerOptions,
    MalformedMessageError,
    Message,
    NetworkError,
    PublisherOptions,
    RedisError,
    StreamqError,
)
from streamq._servers import LocalRedis

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

FAST = Backoff(min=0.01, max=0.05)


def _consumer(url: str, **kw: object) -> AsyncConsumer:
    options: dict[str, object] = {
        "group": "g",
        "consumer": "c1",
        "start_id": "0",
        "read_timeout": 0.2,
        "backoff": FAST,
    }
    options.update(kw)
    return AsyncConsumer(redis=url, **options)


async def _caught_up(server: LocalRedis, stream: str) -> bool:
    return group_caught_up(server, stream)


async def test_foreign_fields_and_binary_garbage_arrive_as_bytes(
    redis_server: LocalRedis, stream_name: str
) -> None:
    garbage = os.urandom(4096)
    client = redis_server.client()
    # Written by "another application": fields streamq never writes, raw bytes.
    foreign = await client.xadd(
        stream_name, {"kind": "x", "blob": garbage, "\u00e9t\u00e9": "\xff"}
    )
    nul = await client.xadd(stream_name, {"nul": b"\x00" * 10, "crlf": b"\r\n$-1\r\n*0\r\n"})
    await client.aclose()
    seen: dict[str, Message] = {}

    async def handler(msg: Message) -> None:
        seen[msg.id] = msg

    consumer = _consumer(redis_server.url)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: _caught_up(redis_server, stream_name), 10, "all handled")
    assert seen[foreign.decode()].values == {
        "kind": b"x",
        "blob": garbage,
        "\u00e9t\u00e9": "\xff".encode(),
    }
    assert seen[nul.decode()].values == {"nul": b"\x00" * 10, "crlf": b"\r\n$-1\r\n*0\r\n"}
    with pytest.raises(UnicodeDecodeError):
        seen[foreign.decode()].text("blob")


async def test_non_utf8_field_names_are_dead_lettered_raw_and_acked(
    redis_server: LocalRedis, stream_name: str
) -> None:
    client = redis_server.client()
    bad = (await client.xadd(stream_name, {b"\xff\xfe": b"v", b"ok": b"\x80"})).decode()
    good = (await client.xadd(stream_name, {"a": "1"})).decode()
    handled: list[str] = []

    async def handler(msg: Message) -> None:
        handled.append(msg.id)

    consumer = _consumer(redis_server.url)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: _caught_up(redis_server, stream_name), 10, "all settled")
        reports = _drain(consumer)
    assert handled == [good]
    malformed = [e for e in reports if isinstance(e, MalformedMessageError)]
    assert len(malformed) == 1
    assert malformed[0].message is not None
    assert malformed[0].message.id == bad
    # Dead-lettered byte for byte, with the metadata after the original fields.
    [(_, fields)] = await client.xrange(f"{stream_name}:dead")
    assert list(fields.items())[:2] == [(b"\xff\xfe", b"v"), (b"ok", b"\x80")]
    assert fields[b"streamq-original-id"] == bad.encode()
    await client.aclose()


async def test_a_ten_megabyte_value_round_trips(redis_server: LocalRedis, stream_name: str) -> None:
    big = os.urandom(10 * 1024 * 1024)
    got: list[bytes] = []

    async def handler(msg: Message) -> None:
        got.append(msg.values["payload"])  # type: ignore[arg-type]

    consumer = _consumer(redis_server.url)
    consumer.subscribe(stream_name, handler)
    async with AsyncPublisher(redis=redis_server.url) as publisher, consumer:
        await publisher.publish(Message(stream_name, {"payload": big}))
        await wait_until(lambda: _caught_up(redis_server, stream_name), 20, "handled")
    assert got == [big]


@pytest.mark.parametrize(
    ("fields", "error", "field"),
    [
        ({"redis": "localhost:6379"}, ValueError, "redis"),
        ({"redis": object()}, TypeError, "redis"),
        ({"group": ""}, ValueError, "group"),
        ({"consumer": b"c1"}, TypeError, "consumer"),
        ({"read_timeout": float("nan")}, ValueError, "read_timeout"),
        ({"handler_timeout": "30"}, TypeError, "handler_timeout"),
        ({"max_retry": True}, TypeError, "max_retry"),
        ({"concurrency": -1}, ValueError, "concurrency"),
        ({"buffer_size": 1.5}, TypeError, "buffer_size"),
        ({"pending_timeout": 0.0}, ValueError, "pending_timeout"),
        ({"start_id": "latest"}, ValueError, "start_id"),
        ({"dead_letter_stream": "{stream}:{oops}"}, ValueError, "dead_letter_stream"),
        ({"network_retry": 2.0}, TypeError, "network_retry"),
        ({"command_timeout": 0}, ValueError, "command_timeout"),
    ],
)
def test_invalid_consumer_options_name_the_field(
    fields: dict[str, object], error: type[Exception], field: str
) -> None:
    options: dict[str, object] = {"redis": "redis://127.0.0.1:1", "group": "g", "consumer": "c"}
    options.update(fields)
    with pytest.raises(error, match=field):
        ConsumerOptions(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "error", "field"),
    [
        ({"stream_max_length": -1}, ValueError, "stream_max_length"),
        ({"safe_trim": True}, ValueError, "safe_trim"),
        ({"safe_trim": "yes", "stream_max_length": 5}, TypeError, "safe_trim"),
        ({"approximate_max_length": 1}, TypeError, "approximate_max_length"),
    ],
)
def test_invalid_publisher_options_name_the_field(
    fields: dict[str, object], error: type[Exception], field: str
) -> None:
    with pytest.raises(error, match=field):
        PublisherOptions(redis="redis://127.0.0.1:1", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["string", "hash", "list"])
async def test_a_key_of_the_wrong_type_is_a_fatal_error_not_a_loop(
    redis_server: LocalRedis, stream_name: str, kind: str
) -> None:
    setup = {
        "string": ("SET", stream_name, "x"),
        "hash": ("HSET", stream_name, "f", "v"),
        "list": ("RPUSH", stream_name, "x"),
    }[kind]
    redis_server.execute(*setup)

    async def handler(msg: Message) -> None:
        return None

    consumer = _consumer(redis_server.url, network_retry=-1)
    consumer.subscribe(stream_name, handler)
    with pytest.raises(RedisError, match="WRONGTYPE"):
        await asyncio.wait_for(consumer.listen(), 10)
    # Fatal at once: not retried, not reported over and over.
    assert consumer.errors().statistics().reported == 0
    async with AsyncPublisher(redis=redis_server.url, network_retry=-1) as publisher:
        with pytest.raises(RedisError, match="WRONGTYPE"):
            await asyncio.wait_for(publisher.publish(Message(stream_name, {"a": 1})), 10)


async def test_a_closed_port_is_a_network_error_after_the_retries() -> None:
    port = await _closed_port()
    url = f"redis://127.0.0.1:{port}/0"
    consumer = _consumer(url, network_retry=2)

    async def handler(msg: Message) -> None:
        return None

    consumer.subscribe("s", handler)
    with pytest.raises(NetworkError) as info:
        await asyncio.wait_for(consumer.listen(), 10)
    assert info.value.retrying is False
    assert consumer.errors().statistics().reported == 2
    async with AsyncPublisher(redis=url, network_retry=2, backoff=FAST) as publisher:
        with pytest.raises(NetworkError):
            await asyncio.wait_for(publisher.publish(Message("s", {"a": 1})), 10)


NOT_REDIS = {
    "http": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    "ssh": b"SSH-2.0-OpenSSH_9.2\r\n",
    "garbage": bytes(range(256)) * 4,
}


@pytest.mark.parametrize("kind", sorted(NOT_REDIS))
async def test_a_server_that_is_not_redis_is_a_clear_fatal_error(kind: str) -> None:
    async with _fake_server(NOT_REDIS[kind]) as (url, connections):
        consumer = _consumer(url, network_retry=-1)

        async def handler(msg: Message) -> None:
            return None

        consumer.subscribe("s", handler)
        with pytest.raises(RedisError, match="is this a Redis server") as info:
            await asyncio.wait_for(consumer.listen(), 10)
        assert "Protocol error" in str(info.value)
        # One connection, no retries: retrying would not make it speak RESP.
        assert len(connections) == 1
        async with AsyncPublisher(redis=url, network_retry=-1) as publisher:
            with pytest.raises(RedisError, match="is this a Redis server"):
                await asyncio.wait_for(publisher.publish(Message("s", {"a": 1})), 10)
        assert len(connections) == 2


async def test_a_server_that_hangs_up_at_once_exhausts_the_retries() -> None:
    async with _fake_server(b"") as (url, connections):
        consumer = _consumer(url, network_retry=3)

        async def handler(msg: Message) -> None:
            return None

        consumer.subscribe("s", handler)
        with pytest.raises(NetworkError, match="Connection closed"):
            await asyncio.wait_for(consumer.listen(), 10)
        # One first attempt and three retries, with backoff between: no hot loop.
        assert len(connections) == 4


def _drain(owner: AsyncConsumer) -> list[StreamqError]:
    out = []
    while (err := owner.errors().get_nowait()) is not None:
        out.append(err)
    return out


async def _closed_port() -> int:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port


class _FakeServerContext:
    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.connections: list[int] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append(1)
        try:
            await asyncio.wait_for(reader.read(1024), 2)
            writer.write(self.reply)
            await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> tuple[str, list[int]]:
        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.ensure_future(self.serve(reader, writer))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0", self.connections

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


def _fake_server(reply: bytes) -> _FakeServerContext:
    """A TCP server on 127.0.0.1 that answers the first bytes it gets with ``reply``."""
    return _FakeServerContext(reply)
