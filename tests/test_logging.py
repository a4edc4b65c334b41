"""Structured logging: every record of the ``streamq`` logger carries its context; no prints."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import redis.asyncio

from streamq import AsyncConsumer, AsyncPublisher, Backoff, Message, discard, fail
from streamq.testing import consume_until, wait_until

pytestmark = pytest.mark.anyio


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    logger = logging.getLogger("streamq")
    handler = _Collect()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_every_record_carries_stream_and_message_id(
    redis_client: redis.asyncio.Redis, stream_name: str, records: list[logging.LogRecord]
) -> None:
    async with AsyncPublisher(redis=redis_client) as pub:
        ids = await pub.publish_many([Message(stream_name, {"n": i}) for i in range(6)])
    await redis_client.xgroup_create(stream_name, "g", id="0")
    # Entry 5 was read by this consumer in an earlier life, then trimmed away.
    await redis_client.xreadgroup("g", "c1", {stream_name: ">"}, count=6)
    await redis_client.xack(stream_name, "g", *ids[:5])
    await redis_client.xdel(stream_name, ids[5])
    await redis_client.xgroup_setid(stream_name, "g", "0")
    release = asyncio.Event()

    async def handle(msg: Message) -> object:
        n = int(msg.values["n"])
        if n == 0:
            return fail("declined once") if msg.deliveries == 1 else None
        if n == 1:
            raise ValueError("poison")
        if n == 2:
            return discard(ValueError("not for us"))
        if n == 3:
            # Ignores the shutdown's cancellation for a moment.
            try:
                await release.wait()
            except asyncio.CancelledError:
                await asyncio.sleep(0.2)
        return None

    consumer = AsyncConsumer(
        redis=redis_client,
        group="g",
        consumer="c1",
        max_retry=1,
        backoff=Backoff(min=0.01, max=0.02),
        shutdown_timeout=0.05,
    )
    consumer.subscribe(stream_name, handle)
    async with consumer:
        await wait_until(
            lambda: consumer.stats().dead_lettered == 1 and consumer.stats().succeeded == 2,
            timeout=5,
        )
    await asyncio.sleep(0.3)  # let the stubborn handler finish

    assert records, "expected some records"
    for record in records:
        assert record.name == "streamq"
        assert hasattr(record, "stream"), record.getMessage()
        assert hasattr(record, "message_id"), record.getMessage()
        assert hasattr(record, "error_type"), record.getMessage()
    by_type = {r.error_type: r for r in records}  # type: ignore[attr-defined]
    assert {"HandlerError", "HandlerPanic", "DeadLetteredError", "MessageLostError"} <= set(by_type)
    for kind in ("HandlerError", "HandlerPanic", "DeadLetteredError", "MessageLostError"):
        record = by_type[kind]
        assert record.stream == stream_name  # type: ignore[attr-defined]
        assert record.message_id in ids  # type: ignore[attr-defined]
    assert by_type["MessageLostError"].message_id == ids[5]  # type: ignore[attr-defined]
    levels = {(r.error_type, r.message_id): r.levelno for r in records}  # type: ignore[attr-defined]
    assert levels["HandlerError", ids[0]] == logging.INFO  # retried: expected churn
    assert levels["HandlerError", ids[2]] == logging.WARNING  # discarded
    assert by_type["DeadLetteredError"].levelno == logging.WARNING
    stuck = [r for r in records if "ignored cancellation" in r.getMessage()]
    assert len(stuck) == 1
    assert stuck[0].levelno == logging.ERROR


def test_the_library_never_prints(redis_url: str, stream_name: str) -> None:
    # A fresh interpreter with no logging configured: Python's last-resort handler
    # would write warnings to stderr if streamq let them through.
    script = textwrap.dedent(
        f"""
        import asyncio
        import redis.asyncio
        from streamq import AsyncConsumer, AsyncPublisher, Backoff, Message, fail
        from streamq.testing import consume_until

        async def main():
            client = redis.asyncio.Redis.from_url({redis_url!r})
            async with AsyncPublisher(redis=client) as pub:
                await pub.publish_many([Message({stream_name!r}, {{"n": i}}) for i in range(4)])

            async def handle(msg):
                if int(msg.values["n"]) == 1:
                    raise ValueError("poison")
                if int(msg.values["n"]) == 2 and msg.deliveries == 1:
                    return fail("once")

            consumer = AsyncConsumer(redis=client, group="g", consumer="c", start_id="0",
                                     max_retry=1, backoff=Backoff(min=0.01, max=0.02))
            consumer.subscribe({stream_name!r}, handle)
            await consume_until(consumer, lambda s: s.dead_lettered == 1 and s.succeeded == 3)
            await client.aclose()

        asyncio.run(main())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == ""


async def test_consume_until_is_quiet_too(
    redis_client: redis.asyncio.Redis, stream_name: str, capfd: pytest.CaptureFixture[str]
) -> None:
    await redis_client.xadd(stream_name, {"a": "1"})

    async def handle(msg: Message) -> None:
        return None

    consumer = AsyncConsumer(redis=redis_client, group="g", consumer="c", start_id="0")
    consumer.subscribe(stream_name, handle)
    await consume_until(consumer, lambda s: s.succeeded == 1)
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""
