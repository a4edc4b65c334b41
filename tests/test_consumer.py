"""AsyncConsumer handling: groups, acks, retries, panics, timeouts, dead-lettering, subscribe.

Every test checks what Redis holds afterwards (XPENDING, XINFO, XLEN), not only
what the handlers saw.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

import pytest
import redis.asyncio
from helpers import (
    add,
    drain_errors,
    group_info,
    make_consumer,
    pending,
    pending_count,
    wait_group,
    wait_until,
)

from streamq import (
    AsyncConsumer,
    Backoff,
    ConsumerState,
    DeadLetteredError,
    HandlerError,
    HandlerPanic,
    MalformedMessageError,
    Message,
    RedisError,
    Result,
    discard,
    fail,
    success,
)

pytestmark = pytest.mark.anyio

Client = redis.asyncio.Redis


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _xrange(client: Client, stream: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (_text(i), {_text(k): _text(v) for k, v in f.items()})
        for i, f in await client.xrange(stream)
    ]


async def _settled(client: Client, stream: str, consumer: AsyncConsumer, n: int) -> None:
    """Wait until ``n`` messages were acked and nothing is pending in Redis."""
    await wait_until(lambda: consumer.stats().acked >= n, what=f"{n} acks")
    await wait_until(lambda: _no_pending(client, stream), what="an empty pending list", timeout=5)


async def _no_pending(client: Client, stream: str) -> bool:
    return await pending_count(client, stream) == 0


# -- groups -------------------------------------------------------------------------


async def test_group_created_at_dollar_with_mkstream(
    redis_client: Client, stream_name: str
) -> None:
    seen: list[str] = []

    async def handler(msg: Message) -> None:
        seen.append(msg.text("n"))

    consumer = make_consumer(redis_client)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_group(redis_client, stream_name)  # the stream did not exist: MKSTREAM
        info = await group_info(redis_client, stream_name, "g")
        assert info is not None
        assert _text(info["last-delivered-id"]) == "0-0"
        await add(redis_client, stream_name, 2)
        await _settled(redis_client, stream_name, consumer, 2)
    assert seen == ["0", "1"]


async def test_dollar_skips_history(redis_client: Client, stream_name: str) -> None:
    old = await add(redis_client, stream_name, 3, old=1)
    seen: list[Message] = []

    async def handler(msg: Message) -> None:
        seen.append(msg)

    consumer = make_consumer(redis_client)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_group(redis_client, stream_name)
        info = await group_info(redis_client, stream_name, "g")
        assert info is not None
        assert _text(info["last-delivered-id"]) == old[-1]
        new = await add(redis_client, stream_name, 1)
        await _settled(redis_client, stream_name, consumer, 1)
    assert [m.id for m in seen] == new


@pytest.mark.parametrize("start_id", ["0", "middle"])
async def test_start_id(redis_client: Client, stream_name: str, start_id: str) -> None:
    ids = await add(redis_client, stream_name, 4)
    if start_id == "middle":
        start_id = ids[1]
    seen: list[str] = []

    async def handler(msg: Message) -> None:
        seen.append(msg.id)

    consumer = make_consumer(redis_client, start_id=start_id)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        expected = ids if start_id == "0" else ids[2:]
        await _settled(redis_client, stream_name, consumer, len(expected))
    assert seen == expected


async def test_existing_group_is_fine(redis_client: Client, stream_name: str) -> None:
    ids = await add(redis_client, stream_name, 3)
    # The group exists already, at 0; the consumer's default "$" does not move it.
    await redis_client.xgroup_create(stream_name, "g", id="0")
    seen: list[str] = []

    async def handler(msg: Message) -> None:
        seen.append(msg.id)

    consumer = make_consumer(redis_client)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 3)
    assert seen == ids
    assert drain_errors(consumer) == []


# -- outcomes -------------------------------------------------------------------------


@pytest.mark.parametrize("returns", ["none", "success"])
async def test_success_acks(redis_client: Client, stream_name: str, returns: str) -> None:
    await add(redis_client, stream_name, 5)
    seen: list[Message] = []

    async def handler(msg: Message) -> Result | None:
        seen.append(msg)
        return None if returns == "none" else success()

    consumer = make_consumer(redis_client, start_id="0")
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 5)
    assert [m.text("n") for m in seen] == ["0", "1", "2", "3", "4"]
    assert all(m.deliveries == 1 and m.retry_count == 0 for m in seen)
    assert all(m.stream == stream_name for m in seen)
    assert all(isinstance(v, bytes) for m in seen for v in m.values.values())
    stats = consumer.stats()
    assert (stats.read, stats.handled, stats.succeeded, stats.acked) == (5, 5, 5, 5)
    assert (stats.failed, stats.discarded, stats.dead_lettered) == (0, 0, 0)
    assert drain_errors(consumer) == []
    info = await group_info(redis_client, stream_name, "g")
    assert info is not None
    assert info["pending"] == 0


async def test_fail_retries_and_redis_counts_deliveries(
    redis_client: Client, stream_name: str
) -> None:
    [entry_id] = await add(redis_client, stream_name, 1)
    seen: list[tuple[int, int]] = []
    counted: list[int] = []

    async def handler(msg: Message) -> Result:
        seen.append((msg.deliveries, msg.retry_count))
        # Redis' own counter agrees with what the handler is told.
        rows = await pending(redis_client, stream_name)
        counted.append(rows[0]["deliveries"])
        return success() if msg.deliveries == 3 else fail(f"attempt {msg.deliveries}")

    consumer = make_consumer(redis_client, start_id="0")
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 1)
    assert seen == [(1, 0), (2, 1), (3, 2)]
    assert counted == [1, 2, 3]
    errors = drain_errors(consumer)
    assert [type(e) for e in errors] == [HandlerError, HandlerError]
    assert all(e.retrying and e.message is not None for e in errors)  # type: ignore[attr-defined]
    assert [str(e.error) for e in errors] == ["attempt 1", "attempt 2"]
    assert all(e.__cause__ is e.error for e in errors)
    assert errors[0].message.id == entry_id  # type: ignore[union-attr]
    stats = consumer.stats()
    assert (stats.handled, stats.failed, stats.retried, stats.succeeded) == (3, 2, 2, 1)


async def test_result_backoff_overrides_policy(redis_client: Client, stream_name: str) -> None:
    await add(redis_client, stream_name, 2)
    calls: Counter[str] = Counter()

    async def handler(msg: Message) -> Result:
        n = msg.text("n")
        calls[n] += 1
        if calls[n] > 1:
            return success()
        # Message 0 asks for a quick retry despite the one-hour policy; message 1
        # asks for an hour, so it is still waiting when the consumer closes.
        return fail("again", backoff=0.01 if n == "0" else 3600)

    consumer = make_consumer(redis_client, start_id="0", backoff=Backoff(min=3600, max=3600))
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await wait_until(lambda: calls["0"] == 2, what="the quick retry")
        await wait_until(lambda: consumer.stats().acked == 1)
        assert calls["1"] == 1
        assert consumer.stats().waiting_retry == 1
    # Closed while waiting: message 1 stays pending for this consumer.
    rows = await pending(redis_client, stream_name)
    assert [(r["consumer"], r["deliveries"]) for r in rows] == [("c1", 1)]


async def test_failed_message_does_not_hold_a_worker(
    redis_client: Client, stream_name: str
) -> None:
    ids = await add(redis_client, stream_name, 4)
    seen: list[str] = []

    async def handler(msg: Message) -> Result:
        seen.append(msg.id)
        return fail("later", backoff=3600) if msg.id == ids[0] else success()

    consumer = make_consumer(redis_client, start_id="0", concurrency=1)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        # With one worker, the others are handled while the first waits its backoff.
        await wait_until(lambda: consumer.stats().acked == 3, what="3 acks")
        stats = consumer.stats()
        assert (stats.waiting_retry, stats.in_flight) == (1, 0)
    assert seen == ids
    rows = await pending(redis_client, stream_name)
    assert [r["id"] for r in rows] == [ids[0]]


async def test_discard_acks_and_reports(redis_client: Client, stream_name: str) -> None:
    [entry_id] = await add(redis_client, stream_name, 1)
    calls = 0
    err = ValueError("bad payload")

    async def handler(msg: Message) -> Result:
        nonlocal calls
        calls += 1
        return discard(err)

    consumer = make_consumer(redis_client, start_id="0")
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 1)
    assert calls == 1
    [reported] = drain_errors(consumer)
    assert type(reported) is HandlerError
    assert reported.error is err
    assert reported.retrying is False  # type: ignore[attr-defined]
    assert reported.message is not None
    assert reported.message.id == entry_id
    assert consumer.stats().discarded == 1
    assert not await redis_client.exists(f"{stream_name}:dead")


async def test_raising_is_a_panic_and_retried(redis_client: Client, stream_name: str) -> None:
    await add(redis_client, stream_name, 1)
    boom = RuntimeError("boom")
    calls = 0

    async def handler(msg: Message) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise boom

    consumer = make_consumer(redis_client, start_id="0")
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 1)
    assert calls == 2
    [panic] = drain_errors(consumer)
    assert isinstance(panic, HandlerPanic)
    assert panic.error is boom
    assert panic.__cause__ is boom
    assert panic.retrying  # type: ignore[attr-defined]


async def test_wrong_return_type_is_a_panic(redis_client: Client, stream_name: str) -> None:
    await add(redis_client, stream_name, 1)

    async def handler(msg: Message) -> Any:
        return "ok" if msg.deliveries == 1 else None

    consumer = make_consumer(redis_client, start_id="0")
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 1)
    [panic] = drain_errors(consumer)
    assert isinstance(panic, HandlerPanic)
    assert isinstance(panic.error, TypeError)


async def test_handler_raising_cancelled_error_is_a_panic(
    redis_client: Client, stream_name: str
) -> None:
    # A CancelledError that did not come from the consumer being cancelled (e.g.
    # the handler awaited a future someone else cancelled) must not kill the worker.
    await add(redis_client, stream_name, 2)
    calls: list[str] = []

    async def handler(msg: Message) -> None:
        calls.append(msg.text("n"))
        if calls == ["0"]:
            raise asyncio.CancelledError

    consumer = make_consumer(redis_client, start_id="0", concurrency=1)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 2)
    assert sorted(calls) == ["0", "0", "1"]
    [panic] = drain_errors(consumer)
    assert isinstance(panic, HandlerPanic)
    assert isinstance(panic.error, asyncio.CancelledError)


async def test_timeout_cancels_the_handler(redis_client: Client, stream_name: str) -> None:
    await add(redis_client, stream_name, 1)
    cancelled = asyncio.Event()
    calls = 0

    async def handler(msg: Message) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

    consumer = make_consumer(redis_client, start_id="0", handler_timeout=0.1)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 1)
    assert cancelled.is_set()
    assert calls == 2
    [err] = drain_errors(consumer)
    assert type(err) is HandlerError
    assert isinstance(err.error, TimeoutError)
    assert err.retrying  # type: ignore[attr-defined]


async def test_handler_timeout_error_of_its_own_is_a_panic(
    redis_client: Client, stream_name: str
) -> None:
    # A TimeoutError the handler raises itself is not the handler_timeout firing.
    await add(redis_client, stream_name, 1)

    async def handler(msg: Message) -> None:
        if msg.deliveries == 1:
            raise TimeoutError("upstream timed out")

    consumer = make_consumer(redis_client, start_id="0", handler_timeout=30)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 1)
    [err] = drain_errors(consumer)
    assert isinstance(err, HandlerPanic)
    assert str(err.error) == "upstream timed out"


class Fatal(BaseException):
    """Stands for KeyboardInterrupt/SystemExit (which would also stop pytest's loop)."""


def _contains(exc: BaseException, kind: type[BaseException]) -> bool:
    if isinstance(exc, kind):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_contains(e, kind) for e in exc.exceptions)
    return False


async def test_base_exceptions_are_not_swallowed(redis_client: Client, stream_name: str) -> None:
    [entry_id] = await add(redis_client, stream_name, 1)

    async def handler(msg: Message) -> None:
        raise Fatal

    consumer = make_consumer(redis_client, start_id="0")
    consumer.subscribe(stream_name, handler)
    with pytest.raises(BaseException) as info:  # noqa: PT011 - checked just below
        await asyncio.wait_for(consumer.listen(), 10)
    assert _contains(info.value, Fatal)
    # Never acked.
    assert [r["id"] for r in await pending(redis_client, stream_name)] == [entry_id]


# -- dead-lettering -------------------------------------------------------------------


@pytest.mark.parametrize("max_retry", [0, 2])
async def test_dead_letter_handler(redis_client: Client, stream_name: str, max_retry: int) -> None:
    await add(redis_client, stream_name, 1)
    calls: list[int] = []
    dead: list[Message] = []

    async def handler(msg: Message) -> Result:
        calls.append(msg.deliveries)
        return fail("nope")

    async def dead_letter(msg: Message) -> None:
        dead.append(msg)

    consumer = make_consumer(redis_client, start_id="0", max_retry=max_retry)
    consumer.subscribe(stream_name, handler, dead_letter)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 1)
    # At most max_retry + 1 calls, then the dead-letter handler exactly once.
    assert calls == list(range(1, max_retry + 2))
    assert len(dead) == 1
    assert dead[0].deliveries == max_retry + 1
    assert consumer.stats().dead_lettered == 1
    assert not await redis_client.exists(f"{stream_name}:dead")
    kinds = [type(e) for e in drain_errors(consumer)]
    assert kinds.count(DeadLetteredError) == 1


async def test_dead_letter_handler_failing_is_retried(
    redis_client: Client, stream_name: str
) -> None:
    await add(redis_client, stream_name, 1)
    calls = 0
    dead_calls = 0

    async def handler(msg: Message) -> Result:
        nonlocal calls
        calls += 1
        return fail("nope")

    async def dead_letter(msg: Message) -> Result:
        nonlocal dead_calls
        dead_calls += 1
        return success() if dead_calls == 3 else fail("dead store down")

    consumer = make_consumer(redis_client, start_id="0", max_retry=1)
    consumer.subscribe(stream_name, handler, dead_letter)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 1)
    # The normal handler is never called again once the message is exhausted.
    assert (calls, dead_calls) == (2, 3)


async def test_dead_letter_stream(redis_client: Client, stream_name: str) -> None:
    [entry_id] = await add(redis_client, stream_name, 1, payload="x")
    calls = 0

    async def handler(msg: Message) -> Result:
        nonlocal calls
        calls += 1
        return fail(ValueError(f"bad {calls}"))

    consumer = make_consumer(redis_client, start_id="0", max_retry=2)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 1)
    assert calls == 3
    [(_, fields)] = await _xrange(redis_client, f"{stream_name}:dead")
    # Original fields, then metadata.
    assert fields["n"] == "0"
    assert fields["payload"] == "x"
    assert fields["streamq-original-id"] == entry_id
    assert fields["streamq-original-stream"] == stream_name
    assert fields["streamq-group"] == "g"
    assert fields["streamq-consumer"] == "c1"
    assert float(fields["streamq-dead-at"]) > 0
    assert fields["streamq-deliveries"] == "3"
    assert "bad 3" in fields["streamq-error"]
    assert "ValueError" in fields["streamq-error"]
    dead = [e for e in drain_errors(consumer) if isinstance(e, DeadLetteredError)]
    assert len(dead) == 1
    assert dead[0].dead_letter_stream == f"{stream_name}:dead"
    assert str(dead[0].error) == "bad 3"
    # The original stream keeps its entry; only the group's pending list is cleared.
    assert await redis_client.xlen(stream_name) == 1


async def test_dead_letter_stream_template(redis_client: Client, key_prefix: str) -> None:
    a, b = f"{key_prefix}a", f"{key_prefix}b"
    await add(redis_client, a, 1)
    await add(redis_client, b, 2)

    async def handler(msg: Message) -> Result:
        return fail("x")

    consumer = make_consumer(
        redis_client, start_id="0", max_retry=0, dead_letter_stream=f"{key_prefix}dlq:{{stream}}"
    )
    consumer.subscribe(a, handler)
    consumer.subscribe(b, handler)
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 3)
    assert await redis_client.xlen(f"{key_prefix}dlq:{a}") == 1
    assert await redis_client.xlen(f"{key_prefix}dlq:{b}") == 2
    assert await pending_count(redis_client, a) == 0
    assert await pending_count(redis_client, b) == 0


async def test_dead_letter_stream_none_drops(redis_client: Client, stream_name: str) -> None:
    await add(redis_client, stream_name, 1)

    async def handler(msg: Message) -> Result:
        return fail("x")

    with pytest.warns(UserWarning, match="dead_letter_stream=None"):
        consumer = make_consumer(redis_client, start_id="0", max_retry=1, dead_letter_stream=None)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 1)
    assert not await redis_client.exists(f"{stream_name}:dead")
    dead = [e for e in drain_errors(consumer) if isinstance(e, DeadLetteredError)]
    assert len(dead) == 1
    assert dead[0].dead_letter_stream is None
    assert consumer.stats().dead_lettered == 1


async def test_max_retry_negative_never_dead_letters(
    redis_client: Client, stream_name: str
) -> None:
    await add(redis_client, stream_name, 1)
    calls = 0

    async def handler(msg: Message) -> Result:
        nonlocal calls
        calls += 1
        return success() if calls == 12 else fail("again")

    consumer = make_consumer(
        redis_client, start_id="0", max_retry=-1, backoff=Backoff(min=0.001, max=0.001)
    )
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 1)
    assert calls == 12
    assert consumer.stats().dead_lettered == 0
    assert not await redis_client.exists(f"{stream_name}:dead")


async def test_panics_and_timeouts_count_towards_max_retry(
    redis_client: Client, stream_name: str
) -> None:
    await add(redis_client, stream_name, 1)
    calls = 0

    async def handler(msg: Message) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("panic")
        await asyncio.sleep(3600)  # times out

    consumer = make_consumer(redis_client, start_id="0", max_retry=1, handler_timeout=0.05)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 1)
    assert calls == 2
    [(_, fields)] = await _xrange(redis_client, f"{stream_name}:dead")
    assert "TimeoutError" in fields["streamq-error"]


# -- subscribe -----------------------------------------------------------------------


async def test_handle_event_objects(redis_client: Client, stream_name: str) -> None:
    await add(redis_client, stream_name, 2)

    class Handler:
        def __init__(self) -> None:
            self.seen: list[str] = []

        async def handle_event(self, msg: Message) -> None:
            self.seen.append(msg.text("n"))

    class DeadLetters:
        async def handle_event(self, msg: Message) -> None:
            return None

    handler = Handler()
    consumer = make_consumer(redis_client, start_id="0")
    consumer.subscribe(stream_name, handler, DeadLetters())
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 2)
    assert handler.seen == ["0", "1"]


async def test_non_coroutine_handlers_are_refused(redis_client: Client) -> None:
    consumer = make_consumer(redis_client)

    def sync_handler(msg: Message) -> None:
        return None

    class SyncObject:
        def handle_event(self, msg: Message) -> None:
            return None

    async def good(msg: Message) -> None:
        return None

    async def no_args() -> None:
        return None

    async def two_args(msg: Message, other: int) -> None:
        return None

    for bad in (sync_handler, SyncObject(), lambda msg: None, object(), None):
        with pytest.raises(TypeError, match="handler"):
            consumer.subscribe("s", bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dead_letter"):
        consumer.subscribe("s", good, sync_handler)  # type: ignore[arg-type]
    for bad_arity in (no_args, two_args):
        with pytest.raises(TypeError, match="one argument"):
            consumer.subscribe("s", bad_arity)  # type: ignore[arg-type]
    assert consumer.streams == []
    await consumer.aclose()


async def test_duplicate_subscribe(redis_client: Client) -> None:
    consumer = make_consumer(redis_client)

    async def handler(msg: Message) -> None:
        return None

    consumer.subscribe("s", handler)
    with pytest.raises(ValueError, match="already subscribed"):
        consumer.subscribe("s", handler)
    with pytest.raises(ValueError, match="stream"):
        consumer.subscribe("", handler)
    assert consumer.streams == ["s"]
    await consumer.aclose()


async def test_listen_without_subscriptions_returns_at_once(redis_client: Client) -> None:
    consumer = make_consumer(redis_client)
    await asyncio.wait_for(consumer.listen(), 5)
    assert consumer.stats().state.value == "closed"
    await consumer.aclose()


async def test_many_streams_one_consumer(redis_client: Client, key_prefix: str) -> None:
    streams = [f"{key_prefix}{i}" for i in range(3)]
    for i, stream in enumerate(streams):
        await add(redis_client, stream, i + 1)
    seen: Counter[str] = Counter()

    def make(stream: str) -> Any:
        async def handler(msg: Message) -> None:
            assert msg.stream == stream
            seen[stream] += 1

        return handler

    consumer = make_consumer(redis_client, start_id="0")
    for stream in streams:
        consumer.subscribe(stream, make(stream))
    assert consumer.streams == streams
    async with consumer:
        await wait_until(lambda: consumer.stats().acked == 6)
    assert seen == {streams[0]: 1, streams[1]: 2, streams[2]: 3}
    for stream in streams:
        assert await pending_count(redis_client, stream) == 0


async def test_each_handler_has_its_own_deadline(redis_client: Client, stream_name: str) -> None:
    # Many quick handlers in a row on one worker (together longer than the timeout)
    # never time out; the slow one does, when due.
    await add(redis_client, stream_name, 21)

    async def handler(msg: Message) -> None:
        slow = msg.text("n") == "20" and msg.deliveries == 1
        await asyncio.sleep(3600 if slow else 0.01)

    consumer = make_consumer(
        redis_client, start_id="0", concurrency=1, handler_timeout=0.1, claim_interval=0
    )
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 21)
    errors = drain_errors(consumer)
    assert [(type(e), e.message.text("n")) for e in errors if e.message] == [(HandlerError, "20")]
    assert isinstance(errors[0].error, TimeoutError)


async def test_handler_that_swallows_its_timeout_keeps_its_result(
    redis_client: Client, stream_name: str
) -> None:
    # Like asyncio.timeout: a handler that catches the cancellation and returns
    # normally keeps its outcome.
    await add(redis_client, stream_name, 2)
    calls = 0

    async def handler(msg: Message) -> None:
        nonlocal calls
        calls += 1
        if msg.text("n") == "0":
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    consumer = make_consumer(redis_client, start_id="0", concurrency=1, handler_timeout=0.05)
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 2)
    assert calls == 2  # the worker survived and handled the next one
    assert consumer.state is ConsumerState.CLOSED


async def test_malformed_entry_is_dead_lettered_untouched(
    redis_client: Client, stream_name: str
) -> None:
    # A field name that is not UTF-8 cannot become a Message.
    bad = _text(await redis_client.xadd(stream_name, {b"\xff\xfe": b"x", b"ok": b"1"}))
    seen: list[Message] = []

    async def handler(msg: Message) -> None:
        seen.append(msg)

    consumer = make_consumer(redis_client, start_id="0")
    consumer.subscribe(stream_name, handler)
    async with consumer:
        await _settled(redis_client, stream_name, consumer, 1)
    assert seen == []
    errors = drain_errors(consumer)
    assert any(isinstance(e, MalformedMessageError) for e in errors)
    [(_, fields)] = await redis_client.xrange(f"{stream_name}:dead")
    assert fields[b"\xff\xfe"] == b"x"
    assert fields[b"ok"] == b"1"
    assert fields[b"streamq-original-id"] == bad.encode()
    assert b"UTF-8" in fields[b"streamq-error"]
    [dead] = [e for e in errors if isinstance(e, DeadLetteredError)]
    assert "malformed" in str(dead)


async def test_dead_letter_stream_refused_is_fatal_and_keeps_the_message(
    redis_client: Client, stream_name: str
) -> None:
    [entry_id] = await add(redis_client, stream_name, 1)
    await redis_client.set(f"{stream_name}:dead", "not a stream")

    async def handler(msg: Message) -> Result:
        return fail("x")

    consumer = make_consumer(redis_client, start_id="0", max_retry=0)
    consumer.subscribe(stream_name, handler)
    with pytest.raises(RedisError, match="WRONGTYPE"):
        await asyncio.wait_for(consumer.listen(), 10)
    # Not stored as a dead letter, so not acked either.
    assert [r["id"] for r in await pending(redis_client, stream_name)] == [entry_id]
    assert consumer.stats().dead_lettered == 0
