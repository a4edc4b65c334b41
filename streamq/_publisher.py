"""AsyncPublisher: XADD with retries, pipelined batches and automatic coalescing."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ._cluster import ClusterTransport
from ._errors import ClosedError, StreamqError, convert
from ._errorstream import ErrorStream
from ._idempotence import FIELD, Tagger, find_stored
from ._message import Message, validate_stream_name, validate_values
from ._options import PublisherOptions
from ._retry import NetworkRetry
from ._transport import Transport, open_transport, send_retrying
from ._trim import safe_trim

__all__ = ["AsyncPublisher", "PublisherStats"]

# Entries per pipelined round trip in publish_many and in coalesced batches.
_BATCH = 1000

_Waiting = tuple[list[Any], asyncio.Future[str]]


class _Lane:
    """Coalesced publishes bound for one master, and the task sending them in rounds.

    A standalone server has one lane. On a cluster each master has its own, so a
    master that is failing over holds up only the publishes routed to it, never a
    round of another master's.
    """

    __slots__ = ("task", "waiting")

    def __init__(self) -> None:
        self.waiting: list[_Waiting] = []
        self.task: asyncio.Task[None] | None = None


@dataclass(frozen=True, slots=True)
class PublisherStats:
    """A snapshot of a publisher's counters.

    Attributes:
        published: Messages Redis confirmed.
        failed: Messages whose publish raised.
        batches: Round trips that carried more than one message.
        trims: Safe trims run (``safe_trim=True``).
        trimmed: Entries deleted by safe trims.
        errors_reported: Non-fatal errors reported.
        errors_dropped: Errors dropped from the ``errors()`` buffer.
    """

    published: int
    failed: int
    batches: int
    trims: int
    trimmed: int
    errors_reported: int
    errors_dropped: int


class AsyncPublisher:
    """Publishes messages to Redis streams.

    ``await publish(msg)`` sends one ``XADD``; calls made concurrently from many
    tasks are coalesced into pipelined round trips automatically (each caller still
    gets its own ID back). ``publish_many`` sends a list in as few round trips as
    possible. Network failures are retried (``network_retry``) and reported to
    ``errors()``; a publish that returned an ID is stored in Redis. On a Redis
    Cluster each master's publishes are coalesced apart: a master that is down or
    failing over delays only the publishes routed to it.

    Use it as ``async with AsyncPublisher(redis=client) as publisher: ...`` or call
    ``await publisher.aclose()`` when done.
    """

    def __init__(self, options: PublisherOptions | None = None, /, **fields: Any) -> None:
        if options is None:
            options = PublisherOptions(**fields)
        elif fields:
            raise TypeError("pass either a PublisherOptions or keyword fields, not both")
        elif not isinstance(options, PublisherOptions):
            raise TypeError(f"options: expected PublisherOptions, got {type(options).__name__}")
        self.options = options
        self._errors = ErrorStream(options.error_buffer)
        self._retry = NetworkRetry(options.backoff, options.network_retry, self._errors.report)
        self._transport: Transport | None = None
        self._closed = False
        self._direct_busy = False
        # Lanes by master address (None: a standalone server, or a cluster slot
        # map not read yet); a lane is dropped when its last round ends.
        self._lanes: dict[Any, _Lane] = {}
        self._route: Callable[[str], Any] | None = None
        # Entries waiting in any lane, not yet sent.
        self._queued = 0
        self._trim_tasks: set[asyncio.Task[None]] = set()
        self._since_trim: dict[str, int] = {}
        # Streams with a trim running, and whether another was asked for meanwhile.
        self._trimming: dict[str, bool] = {}
        self._published = 0
        self._failed = 0
        self._batches = 0
        self._trims = 0
        self._trimmed = 0
        opts = options
        self._trim_args: tuple[Any, ...] = ()
        if opts.stream_max_length > 0 and not opts.safe_trim:
            self._trim_args = (
                ("MAXLEN", "~", opts.stream_max_length)
                if opts.approximate_max_length
                else ("MAXLEN", opts.stream_max_length)
            )
        # Safe trimming runs every tenth of the cap (at least every publish).
        self._trim_every = max(opts.stream_max_length // 10, 1)
        self._tagger = Tagger() if opts.idempotent else None

    # -- public API ---------------------------------------------------------

    async def publish(self, msg: Message) -> str:
        """Append ``msg`` to ``msg.stream`` and return the ID Redis assigned.

        The ID is also written into ``msg.id``.

        Raises:
            TypeError, ValueError: ``msg`` is not a valid Message (nothing is sent).
            NetworkError: Redis stayed unreachable through ``network_retry`` retries.
            RedisError: Redis refused the entry (e.g. WRONGTYPE, an ID not above the
                stream's last).
            ClosedError: The publisher is closed.
        """
        args = self._prepare(msg)
        if not self._direct_busy and not self._queued:
            # Nothing else in flight: one plain awaited XADD, no batching overhead.
            self._direct_busy = True
            try:
                entry_id = await self._send_one(args, msg)
            finally:
                self._direct_busy = False
        else:
            entry_id = await self._enqueue(args)
        msg.id = entry_id
        self._after_publish(msg.stream, 1)
        return entry_id

    async def publish_many(self, msgs: Iterable[Message]) -> list[str]:
        """Append many messages in pipelined round trips (1000 entries each).

        Every message is validated before anything is sent. IDs are returned in
        order and written into each message.

        Raises:
            TypeError, ValueError: A message is invalid (nothing is sent).
            NetworkError, RedisError: As for :meth:`publish`; entries of batches sent
                before the failure are stored.
        """
        batch = list(msgs)
        prepared = [self._prepare(m) for m in batch]
        ids: list[str] = []
        for start in range(0, len(prepared), _BATCH):
            chunk = prepared[start : start + _BATCH]
            replies = await self._send_batch(chunk)
            for offset, reply in enumerate(replies):
                msg = batch[start + offset]
                if isinstance(reply, BaseException):
                    self._failed += len(prepared) - len(ids)
                    err = convert(reply, f"XADD {msg.stream}", message=msg)
                    raise err
                msg.id = reply
                ids.append(reply)
        for msg in batch:
            self._after_publish(msg.stream, 1)
        return ids

    def errors(self) -> ErrorStream:
        """Non-fatal errors (network retries, failed safe trims) as an async iterator."""
        return self._errors

    def stats(self) -> PublisherStats:
        """A snapshot of the publisher's counters."""
        err = self._errors.statistics()
        return PublisherStats(
            published=self._published,
            failed=self._failed,
            batches=self._batches,
            trims=self._trims,
            trimmed=self._trimmed,
            errors_reported=err.reported,
            errors_dropped=err.dropped,
        )

    async def aclose(self) -> None:
        """Wait for publishes in flight, then close streamq's connections; idempotent."""
        if self._closed:
            return
        self._closed = True
        rounds = [lane.task for lane in self._lanes.values()]
        pending = [t for t in (*rounds, *self._trim_tasks) if t is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._transport is not None:
            await self._transport.aclose()
        self._errors.close()

    async def __aenter__(self) -> AsyncPublisher:
        if self._closed:
            raise ClosedError("the publisher is closed")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- internals ----------------------------------------------------------

    def _get_transport(self) -> Transport:
        if self._closed:
            raise ClosedError("the publisher is closed")
        if self._transport is None:
            transport = open_transport(self.options.redis, self.options.command_timeout)
            if isinstance(transport, ClusterTransport):
                self._route = transport.master_of
            self._transport = transport
        return self._transport

    def _prepare(self, msg: Message) -> list[Any]:
        if not isinstance(msg, Message):
            raise TypeError(f"msg: expected a streamq.Message, got {type(msg).__name__}")
        validate_stream_name(msg.stream, "msg.stream")
        values = validate_values(msg.values)
        for mw in self.options.middleware:
            mw(msg)
            values = validate_values(msg.values)
        args: list[Any] = ["XADD", msg.stream, *self._trim_args, msg.id or "*"]
        tagger = self._tagger
        if tagger is not None and FIELD in values:
            # A message passed on from another stream: this publish gets its own tag.
            values = {k: v for k, v in values.items() if k != FIELD}
        for k, v in values.items():
            args.append(k)
            args.append(v)
        if tagger is not None:
            # Last, where find_stored looks first.
            args.append(FIELD)
            args.append(tagger.next())
        if self._closed:
            raise ClosedError("the publisher is closed")
        return args

    async def _send_one(self, args: list[Any], msg: Message) -> str:
        transport = self._get_transport()
        if self._tagger is not None:
            try:
                [reply] = await self._send_batch([args])
            except BaseException:
                self._failed += 1
                raise
            if isinstance(reply, BaseException):
                self._failed += 1
                raise convert(reply, f"XADD {args[1]}", message=msg)
            return str(reply)
        try:
            reply = await self._retry.call(f"XADD {args[1]}", transport.execute, *args, message=msg)
        except BaseException:
            self._failed += 1
            raise
        self._published += 1
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    async def _send_batch(self, batch: list[list[Any]]) -> list[Any]:
        """Send XADDs in one pipeline; returns IDs (str) or per-entry exceptions."""
        transport = self._get_transport()
        what = f"XADD x{len(batch)}"
        if self._tagger is not None:
            replies = await self._send_idempotent(transport, what, batch)
        else:
            # On a cluster each master's part is retried alone: entries a healthy
            # master stored are not sent again while another one fails over.
            # Entries refused with CLUSTERDOWN, TRYAGAIN... (a failover) are sent
            # again: they did not run, and a publish fails only once network_retry
            # is spent.
            replies = await transport.pipeline_retrying(
                what, batch, self._retry, resend_refused=True
            )
        if len(batch) > 1:
            self._batches += 1
        out: list[Any] = []
        for reply in replies:
            if isinstance(reply, BaseException):
                out.append(reply)
            else:
                self._published += 1
                out.append(reply.decode() if isinstance(reply, bytes) else str(reply))
        return out

    async def _send_idempotent(
        self, transport: Transport, what: str, batch: list[list[Any]]
    ) -> list[Any]:
        """Like ``pipeline_retrying(..., resend_refused=True)``, never storing an entry twice.

        Before each retry, the entries the failed attempt may have stored are
        looked up by their tag (see :mod:`streamq._idempotence`); only those not
        found are sent again. On a cluster a failing master fails the attempt as a
        whole, and the lookup finds what the healthy masters stored.
        """
        started = time.monotonic()
        id_at = 2 + len(self._trim_args)

        async def recover(todo: list[int]) -> dict[int, Any]:
            wanted = [(batch[i][1], batch[i][id_at], batch[i][-1]) for i in todo]
            found = await find_stored(transport, wanted, time.monotonic() - started)
            return {todo[k]: entry_id for k, entry_id in found.items()}

        return await send_retrying(what, batch, self._retry, transport.pipeline, True, recover)

    async def _enqueue(self, args: list[Any]) -> str:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        entry = (args, fut)
        route = self._route
        key = None if route is None else route(args[1])
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        lane.waiting.append(entry)
        self._queued += 1
        if lane.task is None:
            # The round task belongs to this publisher; aclose() awaits it.
            lane.task = asyncio.ensure_future(self._run_rounds(key, lane))
        try:
            return await fut
        except asyncio.CancelledError:
            # Not sent yet: withdraw it so a cancelled publish stores nothing.
            with contextlib.suppress(ValueError):
                lane.waiting.remove(entry)
                self._queued -= 1
            raise

    async def _run_rounds(self, key: Any, lane: _Lane) -> None:
        waiting = lane.waiting
        try:
            while waiting:
                batch = waiting[:_BATCH]
                del waiting[:_BATCH]
                self._queued -= len(batch)
                try:
                    replies = await self._send_batch([args for args, _ in batch])
                except BaseException as exc:
                    self._failed += len(batch)
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (args, fut), reply in zip(batch, replies, strict=True):
                    if fut.done():
                        continue
                    if isinstance(reply, BaseException):
                        self._failed += 1
                        fut.set_exception(convert(reply, f"XADD {args[1]}"))
                    else:
                        fut.set_result(reply)
        finally:
            lane.task = None
            if not waiting and self._lanes.get(key) is lane:
                del self._lanes[key]

    def _after_publish(self, stream: str, count: int) -> None:
        opts = self.options
        if not opts.safe_trim:
            return
        n = self._since_trim.get(stream, 0) + count
        if n < self._trim_every:
            self._since_trim[stream] = n
            return
        self._since_trim[stream] = 0
        if stream in self._trimming:
            # One trim per stream at a time: two trims that measured the same
            # excess would each delete it and cut the stream below the cap.
            self._trimming[stream] = True
            return
        self._trimming[stream] = False
        # Trimming is housekeeping: it must not slow the publish that triggered it.
        task = asyncio.ensure_future(self._trim(stream))
        self._trim_tasks.add(task)
        task.add_done_callback(self._trim_tasks.discard)

    async def _trim(self, stream: str) -> None:
        # Not _get_transport(): aclose() waits for this trim after marking the
        # publisher closed, and the publish that asked for it used this transport.
        transport = self._transport
        assert transport is not None
        opts = self.options
        try:
            while True:
                try:
                    result = await self._retry.call(
                        f"safe trim {stream}",
                        functools.partial(
                            safe_trim,
                            transport,
                            stream,
                            opts.stream_max_length,
                            approximate=opts.approximate_max_length,
                        ),
                    )
                except StreamqError as exc:
                    self._errors.report(exc)
                else:
                    self._trims += 1
                    self._trimmed += result.deleted
                if not self._trimming.get(stream):
                    return
                self._trimming[stream] = False
        finally:
            self._trimming.pop(stream, None)
