"""JsonCodec: structured payloads in one field, through a real Redis and a real consumer."""

from __future__ import annotations

import dataclasses
import datetime
import pickle
from pathlib import Path
from typing import Any

import pydantic
import pytest
import redis.asyncio

import streamq
from streamq import (
    AsyncConsumer,
    AsyncPublisher,
    Backoff,
    JsonCodec,
    MalformedMessageError,
    Message,
)
from streamq.testing import consume_until

pytestmark = pytest.mark.anyio


@dataclasses.dataclass
class Item:
    sku: str
    quantity: int


@dataclasses.dataclass
class Order:
    id: str
    items: list[Item]
    note: str | None = None
    by_sku: dict[str, Item] = dataclasses.field(default_factory=dict)


class Invoice(pydantic.BaseModel):
    number: int
    issued: datetime.datetime
    lines: list[str]


def _consumer(client: redis.asyncio.Redis, **kw: Any) -> AsyncConsumer:
    return AsyncConsumer(
        redis=client,
        group="g",
        consumer="c",
        start_id="0",
        backoff=Backoff(min=0.01, max=0.02),
        **kw,
    )


async def _roundtrip(
    client: redis.asyncio.Redis, stream: str, codec: JsonCodec[Any], payload: Any
) -> tuple[Any, Message]:
    async with AsyncPublisher(redis=client) as pub:
        await pub.publish(codec.message(stream, payload, tenant="eu"))
    got: list[tuple[Any, Message]] = []

    async def handle(value: Any, msg: Message) -> None:
        got.append((value, msg))

    consumer = _consumer(client)
    consumer.subscribe(stream, codec.handler(handle))
    await consume_until(consumer, lambda s: s.succeeded == 1)
    [(value, msg)] = got
    return value, msg


async def test_dicts_round_trip_next_to_plain_fields(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    payload = {"id": "A-1", "amount": 9.5, "tags": ["x", "é"], "nested": {"ok": True}}
    value, msg = await _roundtrip(redis_client, stream_name, JsonCodec(), payload)
    assert value == payload
    assert msg.text("tenant") == "eu"
    # What Redis holds is plain JSON text in one field, readable by anyone.
    [(_, fields)] = await redis_client.xrange(stream_name)
    assert set(fields) == {b"payload", b"tenant"}
    assert fields[b"payload"].decode() == (
        '{"id":"A-1","amount":9.5,"tags":["x","é"],"nested":{"ok":true}}'
    )


async def test_nested_dataclasses_are_rebuilt(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    order = Order("A-2", [Item("sku-1", 2), Item("sku-2", 1)], by_sku={"s": Item("s", 3)})
    value, _ = await _roundtrip(redis_client, stream_name, JsonCodec(Order), order)
    assert value == order
    assert isinstance(value.items[0], Item)


async def test_pydantic_models_round_trip(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    invoice = Invoice(
        number=7, issued=datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.UTC), lines=["a"]
    )
    value, _ = await _roundtrip(redis_client, stream_name, JsonCodec(Invoice), invoice)
    assert value == invoice


async def test_undecodable_payload_is_retried_then_dead_lettered_with_the_reason(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    codec = JsonCodec(Order, field="body")
    async with AsyncPublisher(redis=redis_client) as pub:
        await pub.publish(Message(stream_name, {"body": "{not json"}))
        await pub.publish(Message(stream_name, {"body": '{"id": "x", "colour": "red"}'}))
        await pub.publish(Message(stream_name, {"other": "no body at all"}))

    async def handle(order: Order, msg: Message) -> None:
        raise AssertionError("never called")

    consumer = _consumer(redis_client, max_retry=1)
    consumer.subscribe(stream_name, codec.handler(handle))
    await consume_until(consumer, lambda s: s.dead_lettered == 3)
    assert (await redis_client.xpending(stream_name, "g"))["pending"] == 0
    # Handlers run concurrently: dead letters arrive in any order.
    dead = sorted(
        (fields for _, fields in await redis_client.xrange(f"{stream_name}:dead")),
        key=lambda f: tuple(map(int, f[b"streamq-original-id"].split(b"-"))),
    )
    errors = [fields[b"streamq-error"].decode() for fields in dead]
    assert errors[0].startswith("MalformedMessageError: ")
    assert "does not hold Order: JSONDecodeError" in errors[0]
    assert "unexpected field(s) for Order: colour" in errors[1]
    assert "has no 'body' field" in errors[2]
    # The original fields are kept as they were, for a replay after a fix.
    assert dead[0][b"body"] == b"{not json"


def test_decode_errors_are_streamq_errors() -> None:
    msg = Message._received("s", "1-0", {"payload": b"\xff\xfe"}, 1)
    with pytest.raises(MalformedMessageError) as info:
        JsonCodec().decode(msg)
    assert isinstance(info.value, streamq.StreamqError)
    assert info.value.message is msg


def test_never_pickles() -> None:
    # A pickle in the field is just bad JSON: nothing is unpickled or executed.
    msg = Message._received("s", "1-0", {"payload": pickle.dumps({"a": 1})}, 1)
    with pytest.raises(MalformedMessageError):
        JsonCodec().decode(msg)
    source = Path(streamq._codec.__file__).read_text()
    assert "import pickle" not in source
    with pytest.raises(TypeError, match="not JSON serializable"):
        JsonCodec().encode(object())
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        JsonCodec().encode({"x": float("nan")})


def test_encoding_options() -> None:
    when = datetime.date(2024, 1, 2)
    assert JsonCodec(default=str).encode({"d": when}) == '{"d":"2024-01-02"}'
    assert JsonCodec(field="data").fields([1, 2], kind="list") == {"data": "[1,2]", "kind": "list"}
    with pytest.raises(ValueError, match="codec's payload field"):
        JsonCodec().fields({}, payload="x")
    with pytest.raises(ValueError, match="field"):
        JsonCodec(field="")
    assert repr(JsonCodec(Order)) == "JsonCodec(Order, field='payload')"


def test_other_types_validate_through_pydantic_when_installed() -> None:
    msg = Message._received("s", "1-0", {"payload": b"[1, 2, 3]"}, 1)
    assert JsonCodec(list[int]).decode(msg) == [1, 2, 3]
    bad = Message._received("s", "1-0", {"payload": b'["a"]'}, 1)
    with pytest.raises(MalformedMessageError, match="ValidationError"):
        JsonCodec(list[int]).decode(bad)
