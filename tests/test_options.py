"""ConsumerOptions and PublisherOptions: defaults, validation naming the field, constructors."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from streamq import (
    AsyncConsumer,
    AsyncPublisher,
    Backoff,
    ClosedError,
    ConsumerOptions,
    PublisherOptions,
)

URL = "redis://127.0.0.1:1/0"  # never connected to: options are checked offline


@pytest.fixture
def client() -> Iterator[redis.asyncio.Redis]:
    # Building a client opens no connection; nothing here talks to a server.
    return redis.asyncio.Redis(host="127.0.0.1", port=1)


def consumer(**kw: Any) -> ConsumerOptions:
    kw.setdefault("redis", URL)
    kw.setdefault("group", "g")
    kw.setdefault("consumer", "c")
    return ConsumerOptions(**kw)


def test_consumer_defaults_suit_production() -> None:
    opts = consumer()
    assert opts.read_timeout == 2.0
    assert opts.handler_timeout == 30.0
    assert opts.pending_timeout == 60.0
    assert opts.claim_interval == 5.0
    assert opts.max_retry == 5
    assert opts.concurrency == 10
    assert opts.buffer_size == 100
    assert opts.backoff == Backoff()
    assert opts.network_retry == 20
    assert opts.start_id == "$"
    assert opts.dead_letter_stream == "{stream}:dead"
    assert opts.dead_letter_stream_for("orders") == "orders:dead"
    assert opts.shutdown_timeout > 0
    assert opts.error_buffer > 0
    # Claiming is on, and a live handler never looks abandoned.
    assert opts.pending_timeout >= opts.handler_timeout
    # Durations are floats (seconds).
    for name in ("read_timeout", "handler_timeout", "pending_timeout", "claim_interval"):
        assert isinstance(getattr(opts, name), float), name


def test_publisher_defaults() -> None:
    opts = PublisherOptions(redis=URL)
    assert opts.stream_max_length == 0
    assert opts.approximate_max_length is False
    assert opts.safe_trim is False
    assert opts.backoff == Backoff()
    assert opts.network_retry == 20


def test_frozen_and_keyword_only() -> None:
    opts = consumer()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.group = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        ConsumerOptions(URL, "g", "c")  # type: ignore[misc]
    with pytest.raises(TypeError):
        PublisherOptions(URL)  # type: ignore[misc]


def test_redis_accepts_async_client_and_urls(client: redis.asyncio.Redis) -> None:
    assert consumer(redis=client).redis is client
    for url in ("redis://h:1/0", "rediss://h:1", "unix:///tmp/x.sock"):
        assert consumer(redis=url).redis == url
        assert PublisherOptions(redis=url).redis == url


@pytest.mark.parametrize(
    "value",
    [redis.Redis(host="127.0.0.1", port=1), None, 6379, object()],
    ids=["sync-redis.Redis", "None", "int", "object"],
)
def test_redis_of_the_wrong_type(value: Any) -> None:
    with pytest.raises(TypeError, match="redis"):
        consumer(redis=value)
    with pytest.raises(TypeError, match="redis"):
        PublisherOptions(redis=value)


@pytest.mark.parametrize("url", ["", "localhost:6379", "http://h/"])
def test_redis_bad_url(url: str) -> None:
    with pytest.raises(ValueError, match="redis"):
        consumer(redis=url)


# Every field with values that must be refused, and the exception type.
CONSUMER_BAD: list[tuple[str, Any, type[Exception]]] = [
    ("group", "", ValueError),
    ("group", None, TypeError),
    ("group", b"g", TypeError),
    ("consumer", "", ValueError),
    ("consumer", 1, TypeError),
    ("read_timeout", -1, ValueError),
    ("read_timeout", math.nan, ValueError),
    ("read_timeout", math.inf, ValueError),
    ("read_timeout", 0.0001, ValueError),  # below Redis' millisecond resolution
    ("read_timeout", "2", TypeError),
    ("read_timeout", True, TypeError),
    ("handler_timeout", -0.5, ValueError),
    ("handler_timeout", math.nan, ValueError),
    ("pending_timeout", -1, ValueError),
    ("pending_timeout", math.nan, ValueError),
    ("claim_interval", -1, ValueError),
    ("claim_interval", math.nan, ValueError),
    ("shutdown_timeout", -1, ValueError),
    ("shutdown_timeout", math.nan, ValueError),
    ("max_retry", 1.5, TypeError),
    ("max_retry", True, TypeError),
    ("max_retry", "3", TypeError),
    ("concurrency", -1, ValueError),
    ("concurrency", 2.0, TypeError),
    ("buffer_size", -1, ValueError),
    ("buffer_size", None, TypeError),
    ("error_buffer", 0, ValueError),
    ("error_buffer", -5, ValueError),
    ("backoff", 0.5, TypeError),
    ("backoff", None, TypeError),
    ("network_retry", 1.0, TypeError),
    ("network_retry", None, TypeError),
    ("command_timeout", 0, ValueError),
    ("command_timeout", math.nan, ValueError),
    ("start_id", "", ValueError),
    ("start_id", "latest", ValueError),
    ("start_id", ">", ValueError),
    ("start_id", "1-x", ValueError),
    ("start_id", 0, TypeError),
    ("dead_letter_stream", "", ValueError),
    ("dead_letter_stream", "{queue}:dead", ValueError),
    ("dead_letter_stream", "{0}:dead", ValueError),
    ("dead_letter_stream", "{stream:dead", ValueError),
    ("dead_letter_stream", 5, TypeError),
    ("middleware", [print], TypeError),
    ("middleware", (1,), TypeError),
]


@pytest.mark.parametrize(("field", "value", "exc"), CONSUMER_BAD)
def test_consumer_field_validation(field: str, value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=field):
        consumer(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("read_timeout", 0),  # block until an entry arrives
        ("handler_timeout", 0),  # no limit
        ("claim_interval", 0),  # never claim
        ("max_retry", -1),  # never dead-letter
        ("max_retry", 0),
        ("concurrency", 0),  # means 1
        ("buffer_size", 0),  # no read-ahead
        ("network_retry", 0),  # never retry
        ("network_retry", -1),  # retry forever
        ("start_id", "0"),
        ("start_id", "$"),
        ("start_id", "1700000000000-3"),
        ("start_id", "12"),
        ("dead_letter_stream", "dlq:{stream}"),
        ("dead_letter_stream", "all-dead"),  # one stream for every subscription
    ],
)
def test_consumer_zero_and_negative_meanings_accepted(field: str, value: Any) -> None:
    assert getattr(consumer(**{field: value}), field) == value


def test_concurrency_zero_means_one() -> None:
    assert consumer(concurrency=0).effective_concurrency == 1
    assert consumer(concurrency=7).effective_concurrency == 7


def test_pending_timeout_shorter_than_handler_timeout_while_claiming() -> None:
    with pytest.raises(ValueError, match="pending_timeout"):
        consumer(handler_timeout=30, pending_timeout=10)
    with pytest.raises(ValueError, match="pending_timeout"):
        consumer(pending_timeout=0)  # claiming on: 0 would steal live work
    # Claiming off: no constraint.
    assert consumer(handler_timeout=30, pending_timeout=10, claim_interval=0).pending_timeout == 10
    # No handler limit: any pending_timeout goes.
    assert consumer(handler_timeout=0, pending_timeout=1).pending_timeout == 1


def test_dead_letter_stream_none_warns() -> None:
    with pytest.warns(UserWarning, match="dead_letter_stream=None") as record:
        opts = consumer(dead_letter_stream=None)
    assert opts.dead_letter_stream_for("s") is None
    # The warning points at the caller, not at streamq's internals.
    assert record[0].filename == __file__


def test_dead_letter_stream_none_without_dead_lettering_is_quiet() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        consumer(dead_letter_stream=None, max_retry=-1)


PUBLISHER_BAD: list[tuple[str, Any, type[Exception]]] = [
    ("stream_max_length", -1, ValueError),
    ("stream_max_length", 1.5, TypeError),
    ("stream_max_length", True, TypeError),
    ("approximate_max_length", 1, TypeError),
    ("approximate_max_length", "yes", TypeError),
    ("safe_trim", 1, TypeError),
    ("backoff", {"min": 1}, TypeError),
    ("network_retry", 2.0, TypeError),
    ("command_timeout", -1, ValueError),
    ("command_timeout", math.nan, ValueError),
    ("error_buffer", 0, ValueError),
    ("middleware", print, TypeError),
]


@pytest.mark.parametrize(("field", "value", "exc"), PUBLISHER_BAD)
def test_publisher_field_validation(field: str, value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=field):
        PublisherOptions(redis=URL, **{field: value})


def test_safe_trim_needs_a_length() -> None:
    with pytest.raises(ValueError, match="safe_trim"):
        PublisherOptions(redis=URL, safe_trim=True)
    assert PublisherOptions(redis=URL, safe_trim=True, stream_max_length=10).safe_trim


def test_publisher_zero_and_negative_meanings_accepted() -> None:
    for retries in (0, -1, 3):
        assert PublisherOptions(redis=URL, network_retry=retries).network_retry == retries
    assert PublisherOptions(redis=URL, stream_max_length=0).stream_max_length == 0


# -- constructors -----------------------------------------------------------------


@pytest.mark.anyio
async def test_consumer_from_options_or_fields(client: redis.asyncio.Redis) -> None:
    opts = ConsumerOptions(redis=client, group="g", consumer="c", max_retry=2)
    assert AsyncConsumer(opts).options is opts
    built = AsyncConsumer(redis=client, group="g", consumer="c", max_retry=2)
    assert built.options == opts
    with pytest.raises(TypeError, match="not both"):
        AsyncConsumer(opts, max_retry=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="options"):
        AsyncConsumer(PublisherOptions(redis=client))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group"):
        AsyncConsumer(redis=client, group="", consumer="c")
    with pytest.raises(TypeError):
        AsyncConsumer(redis=client, group="g", consumer="c", no_such_option=1)
    await AsyncConsumer(opts).aclose()


@pytest.mark.anyio
async def test_publisher_from_options_or_fields(client: redis.asyncio.Redis) -> None:
    opts = PublisherOptions(redis=client, stream_max_length=5)
    assert AsyncPublisher(opts).options is opts
    assert AsyncPublisher(redis=client, stream_max_length=5).options == opts
    with pytest.raises(TypeError, match="not both"):
        AsyncPublisher(opts, stream_max_length=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="options"):
        AsyncPublisher(ConsumerOptions(redis=client, group="g", consumer="c"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="redis"):
        AsyncPublisher(redis=redis.Redis())


@pytest.mark.anyio
async def test_consumer_closed_before_start_refuses_use(client: redis.asyncio.Redis) -> None:
    consumer_ = AsyncConsumer(redis=client, group="g", consumer="c")
    await consumer_.aclose()
    await consumer_.aclose()  # idempotent
    with pytest.raises(ClosedError):
        await consumer_.listen()
    with pytest.raises(ClosedError):
        consumer_.subscribe("s", _noop)
    # errors() ends at once.
    assert [e async for e in consumer_.errors()] == []


async def _noop(msg: object) -> None:
    return None
