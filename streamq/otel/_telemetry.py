"""OpenTelemetry tracing and metrics for streamq, built on its middleware hooks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, overload

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.trace import SpanKind, Status, StatusCode

from .._admin import count_after
from .._consumer import AsyncConsumer
from .._errors import StreamqError, convert
from .._message import FieldValue, Message
from .._middleware import CallNext
from .._options import ConsumerOptions, PublisherOptions
from .._publisher import AsyncPublisher
from .._result import Result
from .._transport import open_transport
from .._version import __version__
from .._worker import dead_letter_call

__all__ = ["Telemetry", "context_of"]

logger = logging.getLogger("streamq")

# Counting a lag entry by entry (servers without XINFO's lag) gives up past this.
_LAG_COUNT_LIMIT = 10_000

# Span and metric attribute names: OpenTelemetry's messaging conventions where
# they exist, ``streamq.*`` for what is specific to streamq.
SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
GROUP = "messaging.consumer.group.name"
MESSAGE_ID = "messaging.message.id"
OPERATION = "messaging.operation.type"
DELIVERIES = "streamq.deliveries"
CONSUMER = "streamq.consumer"
OUTCOME = "streamq.outcome"
HANDLER = "streamq.handler"


class _FieldGetter(Getter[Mapping[str, FieldValue]]):
    """Reads trace context from message fields (received values are bytes)."""

    def get(self, carrier: Mapping[str, FieldValue], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        if isinstance(value, bytes):
            return [value.decode("utf-8", "replace")]
        return [str(value)]

    def keys(self, carrier: Mapping[str, FieldValue]) -> list[str]:
        return list(carrier)


_GETTER = _FieldGetter()


def _entry_time(entry_id: str) -> float | None:
    """When Redis stored an auto-ID entry (its ID is milliseconds since the epoch)."""
    ms, _, _ = entry_id.partition("-")
    return int(ms) / 1000 if ms.isdigit() else None


class _ConsumerMiddleware:
    """Handler middleware bound to one consumer's options (group, max_retry, dead letters)."""

    def __init__(self, telemetry: Telemetry, options: ConsumerOptions) -> None:
        self._t = telemetry
        self._options = options
        self._group = options.group
        self._consumer = options.consumer

    async def __call__(self, msg: Message, call_next: CallNext) -> Result:
        t = self._t
        # The same middleware wraps the subscription's dead-letter handler.
        dead_letter = dead_letter_call.get()
        parent = t.propagator.extract(msg.values, getter=_GETTER)
        attributes: dict[str, Any] = {
            SYSTEM: "redis",
            DESTINATION: msg.stream,
            GROUP: self._group,
            CONSUMER: self._consumer,
            MESSAGE_ID: msg.id,
            OPERATION: "process",
            DELIVERIES: msg.deliveries,
            HANDLER: "dead_letter" if dead_letter else "handler",
        }
        span = t.tracer.start_span(
            f"{'dead_letter' if dead_letter else 'process'} {msg.stream}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        metric_attrs = {DESTINATION: msg.stream, GROUP: self._group}
        started = time.perf_counter()
        outcome = "error"
        try:
            with trace.use_span(span, end_on_exit=False, record_exception=False):
                try:
                    result = await call_next(msg)
                except asyncio.CancelledError:
                    # handler_timeout or shutdown: either way the entry stays pending
                    # and comes back.
                    outcome = "cancelled"
                    span.set_status(Status(StatusCode.ERROR, "cancelled"))
                    self._will_retry(span, msg, "handler cancelled (handler_timeout or shutdown)")
                    raise
                except Exception as exc:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                    self._after_failure(span, msg, f"{type(exc).__name__}: {exc}", dead_letter)
                    raise
            error = result.error
            if error is None and dead_letter:
                # Exhausted, and now taken by the dead-letter handler: acked.
                outcome = "dead_lettered"
            elif error is None:
                outcome = "success"
                born = _entry_time(msg.id)
                if born is not None:
                    t.latency.record(max(time.time() - born, 0.0), metric_attrs)
            elif not result.retry:
                outcome = "discarded"
                span.set_status(Status(StatusCode.ERROR, str(error)))
                span.add_event("streamq.discard", {"streamq.error": str(error)})
            else:
                outcome = "failed"
                span.set_status(Status(StatusCode.ERROR, str(error)))
                self._after_failure(span, msg, str(error), dead_letter, result.backoff)
            return result
        finally:
            span.set_attribute(OUTCOME, outcome)
            span.end()
            t.duration.record(time.perf_counter() - started, {**metric_attrs, OUTCOME: outcome})

    def _after_failure(
        self,
        span: trace.Span,
        msg: Message,
        error: str,
        dead_letter: bool,
        backoff: float | None = None,
    ) -> None:
        # The same rules the consumer applies right after this call returns: a
        # failed dead-letter handler is retried after a backoff, a handler that
        # exhausted max_retry hands the message to dead-lettering.
        opts = self._options
        if not dead_letter and opts.max_retry >= 0 and msg.retry_count >= opts.max_retry:
            target = opts.dead_letter_stream_for(msg.stream)
            span.add_event(
                "streamq.dead_letter",
                {
                    "streamq.error": error,
                    "streamq.max_retry": opts.max_retry,
                    "streamq.dead_letter_stream": target or "",
                },
            )
            return
        self._will_retry(span, msg, error, backoff)

    def _will_retry(
        self, span: trace.Span, msg: Message, error: str, backoff: float | None = None
    ) -> None:
        opts = self._options
        if backoff is None:
            backoff = opts.backoff.for_attempt(msg.retry_count)
        span.add_event(
            "streamq.retry",
            {
                "streamq.error": error,
                "streamq.next_delivery": msg.deliveries + 1,
                "streamq.backoff": backoff,
            },
        )


class _PublishMiddleware:
    """Publish middleware: a PRODUCER span per message, its context injected into the fields."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._t = telemetry

    def __call__(self, msg: Message) -> None:
        t = self._t
        span = t.tracer.start_span(
            f"publish {msg.stream}",
            kind=SpanKind.PRODUCER,
            attributes={SYSTEM: "redis", DESTINATION: msg.stream, OPERATION: "send"},
        )
        try:
            ctx = trace.set_span_in_context(span)
            carrier: dict[str, str] = {}
            t.propagator.inject(carrier, context=ctx)
            msg.values.update(carrier)
        finally:
            span.end()


class Telemetry:
    """Traces and metrics for streamq consumers and publishers through OpenTelemetry.

    Tracing: publishing starts a ``publish <stream>`` span and writes its context
    into the message fields (``traceparent``, ...); consuming extracts it and
    runs each handler call in a ``process <stream>`` span (a child of the
    publisher's) with the stream, group, consumer, message ID and delivery
    count. A failure that will be retried adds a ``streamq.retry`` event, one
    that exhausted ``max_retry`` a ``streamq.dead_letter`` event, a discard a
    ``streamq.discard`` event. A subscription's dead-letter handler runs in a
    ``dead_letter <stream>`` span (``streamq.handler="dead_letter"``): its
    success is the ``dead_lettered`` outcome, its failure a ``streamq.retry``
    event (it is called again after a backoff).

    Metrics (meter ``streamq``): observable counters read from ``stats()`` of
    every observed consumer and publisher (``streamq.messages.published``,
    ``.handled``, ``.failed``, ``.retried``, ``.dead_lettered``, ``.claimed``),
    histograms ``streamq.handler.duration`` and ``streamq.message.latency``
    (seconds from the entry's creation in Redis to its successful handling),
    and gauges ``streamq.consumer.in_flight``, ``streamq.consumer.buffered`` and
    ``streamq.group.lag``.

    Example::

        telemetry = Telemetry()   # the global tracer and meter providers
        consumer = AsyncConsumer(telemetry.instrument(
            ConsumerOptions(redis=client, group="billing", consumer="worker-1")))
        publisher = AsyncPublisher(telemetry.instrument(PublisherOptions(redis=client)))
        consumer.subscribe("orders", handle)
        async with consumer, telemetry.observe(consumer):
            ...

    Args:
        tracer_provider: Default: the global one.
        meter_provider: Default: the global one.
        propagator: How trace context is written into fields. Default: the global
            one (W3C trace context and baggage unless configured otherwise).
        lag_interval: Seconds between two reads of the group lag by
            :meth:`observe` (default 10.0).
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        propagator: TextMapPropagator | None = None,
        lag_interval: float = 10.0,
    ) -> None:
        if not lag_interval > 0:
            raise ValueError(f"lag_interval: must be > 0 seconds, got {lag_interval!r}")
        self.tracer = trace.get_tracer("streamq", __version__, tracer_provider=tracer_provider)
        self.meter = metrics.get_meter("streamq", __version__, meter_provider=meter_provider)
        self.propagator = propagator if propagator is not None else propagate.get_global_textmap()
        self.lag_interval = lag_interval
        self._consumers: weakref.WeakSet[AsyncConsumer] = weakref.WeakSet()
        self._publishers: weakref.WeakSet[AsyncPublisher] = weakref.WeakSet()
        self._lag: dict[tuple[str, str], int] = {}
        self.duration = self.meter.create_histogram(
            "streamq.handler.duration", unit="s", description="Handler call duration"
        )
        self.latency = self.meter.create_histogram(
            "streamq.message.latency",
            unit="s",
            description="From the entry's creation in Redis to its successful handling",
        )
        consumer_counters = {
            "handled": "Handler calls that returned",
            "failed": "Handler calls that failed and will be retried or dead-lettered",
            "retried": "Redeliveries after a failure",
            "dead_lettered": "Messages that exhausted max_retry",
            "claimed": "Messages taken over from dead consumers",
        }
        for name, text in consumer_counters.items():
            self.meter.create_observable_counter(
                f"streamq.messages.{name}",
                callbacks=[self._consumer_callback(name)],
                unit="{message}",
                description=text,
            )
        self.meter.create_observable_counter(
            "streamq.messages.published",
            callbacks=[self._observe_published],
            unit="{message}",
            description="Messages Redis confirmed",
        )
        for name, text in (
            ("in_flight", "Handlers running"),
            ("buffered", "Messages read and waiting for a handler"),
        ):
            self.meter.create_observable_gauge(
                f"streamq.consumer.{name}",
                callbacks=[self._consumer_callback(name)],
                unit="{message}",
                description=text,
            )
        self.meter.create_observable_gauge(
            "streamq.group.lag",
            callbacks=[self._observe_lag],
            unit="{message}",
            description="Entries not yet delivered to the group (read every lag_interval)",
        )

    # -- wiring ------------------------------------------------------------------

    @overload
    def instrument(self, options: ConsumerOptions) -> ConsumerOptions: ...
    @overload
    def instrument(self, options: PublisherOptions) -> PublisherOptions: ...
    def instrument(self, options: ConsumerOptions | PublisherOptions) -> Any:
        """Return ``options`` with tracing middleware added (outermost).

        Raises:
            TypeError: ``options`` is neither a ConsumerOptions nor a PublisherOptions.
        """
        if isinstance(options, ConsumerOptions):
            handler_mw = _ConsumerMiddleware(self, options)
            return dataclasses.replace(options, middleware=(handler_mw, *options.middleware))
        if isinstance(options, PublisherOptions):
            publish_mw = _PublishMiddleware(self)
            return dataclasses.replace(options, middleware=(publish_mw, *options.middleware))
        raise TypeError(
            f"options: expected ConsumerOptions or PublisherOptions, got {type(options).__name__}"
        )

    @contextlib.asynccontextmanager
    async def observe(self, target: AsyncConsumer | AsyncPublisher) -> AsyncIterator[None]:
        """Report ``target``'s statistics as metrics while the block runs.

        For a consumer it also reads the lag of its group on each subscribed stream
        every ``lag_interval`` seconds (``XINFO GROUPS``, on a connection of its own).
        """
        if isinstance(target, AsyncPublisher):
            self._publishers.add(target)
            try:
                yield
            finally:
                self._publishers.discard(target)
            return
        if not isinstance(target, AsyncConsumer):
            raise TypeError(
                f"target: expected AsyncConsumer or AsyncPublisher, got {type(target).__name__}"
            )
        self._consumers.add(target)
        poller = asyncio.ensure_future(self._poll_lag(target))
        try:
            yield
        finally:
            self._consumers.discard(target)
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            group = target.options.group
            for stream in target.streams:
                self._lag.pop((stream, group), None)

    # -- metrics callbacks --------------------------------------------------------

    def _consumer_callback(self, name: str) -> Any:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            for consumer in list(self._consumers):
                stats = consumer.stats()
                yield Observation(
                    getattr(stats, name),
                    {GROUP: consumer.options.group, CONSUMER: consumer.options.consumer},
                )

        return callback

    def _observe_published(self, options: CallbackOptions) -> Iterable[Observation]:
        for publisher in list(self._publishers):
            yield Observation(publisher.stats().published, {"streamq.publisher": id(publisher)})

    def _observe_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        for (stream, group), lag in list(self._lag.items()):
            yield Observation(lag, {DESTINATION: stream, GROUP: group})

    async def _poll_lag(self, consumer: AsyncConsumer) -> None:
        opts = consumer.options
        transport = open_transport(opts.redis, opts.command_timeout)
        try:
            while True:
                for stream in consumer.streams:
                    try:
                        await self._read_lag(transport, stream, opts.group)
                    except StreamqError as exc:
                        logger.debug(
                            "streamq.otel: cannot read the lag of %s: %s",
                            stream,
                            exc,
                            extra={"stream": stream, "message_id": None},
                        )
                await asyncio.sleep(self.lag_interval)
        finally:
            await transport.aclose()

    async def _read_lag(self, transport: Any, stream: str, group: str) -> None:
        try:
            rows = await transport.execute("XINFO", "GROUPS", stream)
        except Exception as exc:
            raise convert(exc, f"XINFO GROUPS {stream}") from None
        for raw in rows or ():
            fields = {
                (k.decode() if isinstance(k, bytes) else str(k)): v
                for k, v in zip(raw[::2], raw[1::2], strict=True)
            }
            name = fields.get("name")
            if (name.decode() if isinstance(name, bytes) else name) != group:
                continue
            raw_lag = fields.get("lag")
            lag = None if raw_lag is None else int(raw_lag)
            if lag is None:
                # Redis < 7.0 reports no lag, 7.x none after deletions: count
                # what follows the last delivered entry, up to a limit.
                last = fields.get("last-delivered-id", b"0-0")
                last_id = last.decode() if isinstance(last, bytes) else str(last)
                try:
                    lag = await count_after(transport, stream, last_id, limit=_LAG_COUNT_LIMIT)
                except StreamqError:
                    lag = None
            if lag is None:
                self._lag.pop((stream, group), None)
            else:
                self._lag[(stream, group)] = lag


def context_of(msg: Message, propagator: TextMapPropagator | None = None) -> Context:
    """The trace context carried by ``msg``'s fields, e.g. to link spans of your own.

    Args:
        msg: A received (or about to be published) message.
        propagator: Default: the global one.
    """
    prop = propagator if propagator is not None else propagate.get_global_textmap()
    return prop.extract(msg.values, getter=_GETTER)
