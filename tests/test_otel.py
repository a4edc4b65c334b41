"""streamq.otel: traces and metrics checked with the OpenTelemetry SDK's in-memory exporters."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from streamq import (
    AsyncConsumer,
    AsyncPublisher,
    Backoff,
    ConsumerOptions,
    Message,
    PublisherOptions,
    fail,
)
from streamq.otel import Telemetry, context_of
from streamq.testing import consume_until, wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def reader() -> Iterator[tuple[MeterProvider, InMemoryMetricReader]]:
    metric_reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[metric_reader])
    yield provider, metric_reader
    provider.shutdown()


def _options(client: redis.asyncio.Redis, **kw: Any) -> ConsumerOptions:
    kw.setdefault("max_retry", 1)
    return ConsumerOptions(
        redis=client,
        group="billing",
        consumer="worker-1",
        start_id="0",
        backoff=Backoff(min=0.01, max=0.02),
        **kw,
    )


def _by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return sorted(
        (s for s in finished if s.name == name),
        key=lambda s: (s.attributes or {}).get("streamq.deliveries", 0),  # type: ignore[arg-type,return-value]
    )


async def test_trace_context_flows_from_publisher_to_handler_with_retry_and_dead_letter_events(
    redis_client: redis.asyncio.Redis,
    stream_name: str,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    telemetry = Telemetry(tracer_provider=provider)
    tracer = provider.get_tracer("app")
    with tracer.start_as_current_span("POST /orders") as request:
        async with AsyncPublisher(telemetry.instrument(PublisherOptions(redis=redis_client))) as p:
            await p.publish(Message(stream_name, {"order": "flaky"}))
            await p.publish(Message(stream_name, {"order": "poison"}))
    trace_id = request.get_span_context().trace_id

    inner_parents: list[int] = []

    async def handle(msg: Message) -> Any:
        # The delivery's span is current while the handler runs.
        inner_parents.append(trace.get_current_span().get_span_context().span_id)
        with tracer.start_as_current_span("charge card") as inner:
            assert inner.get_span_context().trace_id == trace_id
        assert context_of(msg) is not None
        if msg.text("order") == "poison":
            raise ValueError("card declined")
        if msg.deliveries == 1:
            return fail("gateway timeout")
        return None

    consumer = AsyncConsumer(telemetry.instrument(_options(redis_client)))
    consumer.subscribe(stream_name, handle)
    await consume_until(consumer, lambda s: s.succeeded == 1 and s.dead_lettered == 1)

    finished = exporter.get_finished_spans()
    publishes = _by_name(finished, f"publish {stream_name}")
    assert len(publishes) == 2
    assert all(s.kind is SpanKind.PRODUCER for s in publishes)
    assert all(
        s.parent is not None and s.parent.span_id == request.get_span_context().span_id
        for s in publishes
    )
    process = [s for s in finished if s.name == f"process {stream_name}"]
    assert len(process) == 4
    entries = {
        fields[b"order"]: eid.decode() for eid, fields in await redis_client.xrange(stream_name)
    }
    for span in process:
        attrs = dict(span.attributes or {})
        assert span.kind is SpanKind.CONSUMER
        assert span.context is not None
        assert span.context.trace_id == trace_id
        assert attrs["messaging.destination.name"] == stream_name
        assert attrs["messaging.consumer.group.name"] == "billing"
        assert attrs["messaging.message.id"] in entries.values()
        assert attrs["messaging.system"] == "redis"
        # Each delivery is a child of the publish span of its message.
        publish_ids = {p.context.span_id for p in publishes if p.context is not None}
        assert span.parent is not None
        assert span.parent.span_id in publish_ids

    def spans_of(order: bytes) -> list[ReadableSpan]:
        return sorted(
            (s for s in process if (s.attributes or {})["messaging.message.id"] == entries[order]),
            key=lambda s: int((s.attributes or {})["streamq.deliveries"]),  # type: ignore[arg-type]
        )

    first, second = spans_of(b"flaky")
    assert [e.name for e in first.events] == ["streamq.retry"]
    assert first.events[0].attributes is not None
    assert first.events[0].attributes["streamq.error"] == "gateway timeout"
    assert first.status.status_code is StatusCode.ERROR
    assert (first.attributes or {})["streamq.outcome"] == "failed"
    assert second.events == ()
    assert second.status.status_code is StatusCode.UNSET
    assert (second.attributes or {})["streamq.outcome"] == "success"

    first, last = spans_of(b"poison")
    assert [e.name for e in first.events] == ["exception", "streamq.retry"]
    assert [e.name for e in last.events] == ["exception", "streamq.dead_letter"]
    dead_event = last.events[1].attributes or {}
    assert dead_event["streamq.dead_letter_stream"] == f"{stream_name}:dead"
    assert dead_event["streamq.error"] == "ValueError: card declined"
    # The handler's own spans are children of the delivery's span.
    assert set(inner_parents) == {s.context.span_id for s in process if s.context is not None}
    charges = [s for s in finished if s.name == "charge card"]
    assert {s.parent.span_id for s in charges if s.parent} == set(inner_parents)
    # What Redis holds: nothing pending, the dead letter keeps its trace context.
    assert (await redis_client.xpending(stream_name, "billing"))["pending"] == 0
    [(_, dead_fields)] = await redis_client.xrange(f"{stream_name}:dead")
    assert dead_fields[b"traceparent"].startswith(b"00-" + f"{trace_id:032x}".encode())


async def test_a_dead_letter_handler_gets_spans_of_its_own(
    redis_client: redis.asyncio.Redis,
    stream_name: str,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    telemetry = Telemetry(tracer_provider=provider)
    await redis_client.xadd(stream_name, {"order": "poison"})
    dead_calls = 0

    async def handle(msg: Message) -> None:
        raise ValueError("card declined")

    async def dead_letter(msg: Message) -> Any:
        nonlocal dead_calls
        dead_calls += 1
        if dead_calls == 1:
            return fail("archive unavailable")  # retried after a backoff
        return None

    consumer = AsyncConsumer(telemetry.instrument(_options(redis_client)))
    consumer.subscribe(stream_name, handle, dead_letter)
    await consume_until(consumer, lambda s: s.dead_lettered == 1)

    finished = exporter.get_finished_spans()
    process = _by_name(finished, f"process {stream_name}")
    dead = _by_name(finished, f"dead_letter {stream_name}")
    assert [[e.name for e in s.events] for s in process] == [
        ["exception", "streamq.retry"],
        ["exception", "streamq.dead_letter"],
    ]
    assert {(s.attributes or {})["streamq.handler"] for s in process} == {"handler"}
    # The dead-letter handler's failure is a retry of the dead-letter handler, its
    # success the end of the message: never labelled as the handler's outcome.
    assert [[e.name for e in s.events] for s in dead] == [["streamq.retry"], []]
    assert [(s.attributes or {})["streamq.outcome"] for s in dead] == ["failed", "dead_lettered"]
    assert {(s.attributes or {})["streamq.handler"] for s in dead} == {"dead_letter"}
    assert (await redis_client.xpending(stream_name, "billing"))["pending"] == 0
    assert await redis_client.xlen(f"{stream_name}:dead") == 0  # the handler took it


async def test_handler_timeout_is_a_cancelled_span_with_a_retry_event(
    redis_client: redis.asyncio.Redis,
    stream_name: str,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    telemetry = Telemetry(tracer_provider=provider)
    await redis_client.xadd(stream_name, {"a": "1"})

    async def slow(msg: Message) -> None:
        if msg.deliveries == 1:
            await asyncio.sleep(10)

    options = _options(redis_client, handler_timeout=0.05, max_retry=3)
    consumer = AsyncConsumer(telemetry.instrument(options))
    consumer.subscribe(stream_name, slow)
    await consume_until(consumer, lambda s: s.succeeded == 1)
    first, second = sorted(
        exporter.get_finished_spans(),
        key=lambda s: int((s.attributes or {})["streamq.deliveries"]),  # type: ignore[arg-type]
    )
    assert (first.attributes or {})["streamq.outcome"] == "cancelled"
    assert [e.name for e in first.events] == ["streamq.retry"]
    assert (second.attributes or {})["streamq.outcome"] == "success"


def _metrics(metric_reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = metric_reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    if data is None:
        return out
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out[metric.name] = list(metric.data.data_points)
    return out


async def test_metrics_counters_histograms_and_gauges(
    redis_client: redis.asyncio.Redis,
    stream_name: str,
    reader: tuple[MeterProvider, InMemoryMetricReader],
) -> None:
    provider, metric_reader = reader
    telemetry = Telemetry(meter_provider=provider, lag_interval=0.02)
    publisher = AsyncPublisher(telemetry.instrument(PublisherOptions(redis=redis_client)))
    release = asyncio.Event()

    async def handle(msg: Message) -> Any:
        n = int(msg.values["n"])
        if n == 0:
            await release.wait()  # holds the only handler: the rest waits in Redis
        if n == 1:
            raise ValueError("always fails")
        if n == 2 and msg.deliveries == 1:
            return fail("once")
        return None

    # One handler and no read-ahead: while message 0 is held, the others lag.
    consumer = AsyncConsumer(
        telemetry.instrument(_options(redis_client, concurrency=1, buffer_size=0))
    )
    consumer.subscribe(stream_name, handle)
    async with publisher, telemetry.observe(publisher):
        await publisher.publish_many([Message(stream_name, {"n": i}) for i in range(5)])
        async with consumer, telemetry.observe(consumer):

            def lag() -> int | None:
                points = _metrics(metric_reader).get("streamq.group.lag", [])
                return points[0].value if points else None

            await wait_until(lambda: lag() == 4, timeout=5)
            in_flight = _metrics(metric_reader)["streamq.consumer.in_flight"]
            assert [p.value for p in in_flight] == [1]
            assert dict(in_flight[0].attributes) == {
                "messaging.consumer.group.name": "billing",
                "streamq.consumer": "worker-1",
            }
            release.set()
            await wait_until(lambda: consumer.stats().succeeded == 4 and lag() == 0, timeout=5)
            await wait_until(lambda: consumer.stats().dead_lettered == 1, timeout=5)
            data = _metrics(metric_reader)
    assert [p.value for p in data["streamq.messages.published"]] == [5]
    assert [p.value for p in data["streamq.messages.handled"]] == [consumer.stats().handled]
    assert [p.value for p in data["streamq.messages.retried"]] == [2]
    assert [p.value for p in data["streamq.messages.dead_lettered"]] == [1]
    assert [p.value for p in data["streamq.messages.claimed"]] == [0]
    durations = {p.attributes["streamq.outcome"]: p.count for p in data["streamq.handler.duration"]}
    assert durations == {"success": 4, "failed": 1, "error": 2}
    [latency] = data["streamq.message.latency"]
    assert latency.count == 4
    assert latency.min >= 0
    # Once observation ends, the consumer is no longer reported.
    after = _metrics(metric_reader)
    assert after.get("streamq.consumer.in_flight", []) == []
    assert after.get("streamq.group.lag", []) == []


def test_instrument_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="ConsumerOptions or PublisherOptions"):
        Telemetry().instrument("redis://x")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="lag_interval"):
        Telemetry(lag_interval=0)
