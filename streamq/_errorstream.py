"""The async iterator of non-fatal errors that consumers and publishers report."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

from ._errors import HandlerError, NetworkError, StreamqError

__all__ = ["ErrorStream", "ErrorStreamStatistics"]

logger = logging.getLogger("streamq")


@dataclass(frozen=True, slots=True)
class ErrorStreamStatistics:
    """A snapshot of an :class:`ErrorStream`.

    Attributes:
        reported: Errors reported since the start.
        buffered: Errors waiting to be read.
        dropped: Errors dropped because the buffer was full (oldest first).
        max_buffer: The buffer's capacity.
    """

    reported: int
    buffered: int
    dropped: int
    max_buffer: int


class ErrorStream:
    """Non-fatal errors, as an async iterator: ``async for err in consumer.errors(): ...``.

    Reporting never waits: the buffer keeps the newest ``max_buffer`` errors and
    counts the ones it drops, so a slow or absent reader never slows processing.
    Every error is also logged to the ``streamq`` logger when reported. Iteration
    ends (``StopAsyncIteration``) once the owner is closed and the buffer is empty.
    """

    def __init__(self, max_buffer: int) -> None:
        self._buffer: deque[StreamqError] = deque()
        self._max = max_buffer
        self._closed = False
        self._reported = 0
        self._dropped = 0
        self._waiter: asyncio.Event | None = None

    def report(self, error: StreamqError) -> None:
        """Log ``error`` and buffer it for readers (dropping the oldest when full)."""
        self._reported += 1
        _log(error)
        if self._closed:
            return
        if len(self._buffer) >= self._max:
            self._buffer.popleft()
            self._dropped += 1
        self._buffer.append(error)
        if self._waiter is not None:
            self._waiter.set()

    def close(self) -> None:
        """End iteration once the buffered errors are read."""
        self._closed = True
        if self._waiter is not None:
            self._waiter.set()

    def statistics(self) -> ErrorStreamStatistics:
        """Counts of reported, buffered and dropped errors."""
        return ErrorStreamStatistics(
            reported=self._reported,
            buffered=len(self._buffer),
            dropped=self._dropped,
            max_buffer=self._max,
        )

    def __aiter__(self) -> ErrorStream:
        return self

    async def __anext__(self) -> StreamqError:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            if self._waiter is None:
                self._waiter = asyncio.Event()
            self._waiter.clear()
            await self._waiter.wait()
        return self._buffer.popleft()

    def get_nowait(self) -> StreamqError | None:
        """The oldest buffered error, or ``None`` when there is none."""
        return self._buffer.popleft() if self._buffer else None


def _listened() -> bool:
    """Whether a record of the ``streamq`` logger would reach a handler that emits it.

    streamq installs a ``NullHandler`` (so Python's last-resort handler stays
    quiet); when that is all there is, a record goes nowhere, and building it cost
    more (about 5 us) than the rest of a failed message's bookkeeping.
    """
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if not isinstance(handler, logging.NullHandler):
                return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def _log(error: StreamqError) -> None:
    msg = error.message
    level = logging.WARNING
    if isinstance(error, NetworkError) and not error.retrying:
        level = logging.ERROR
    elif isinstance(error, HandlerError) and error.retrying:
        # Expected churn of a retrying workload; the final outcome is logged louder.
        level = logging.INFO
    if not logger.isEnabledFor(level) or not _listened():
        return
    # Every record carries stream and message_id (None when not about one message),
    # so that log filters and JSON formatters can rely on them.
    extra = {
        "stream": msg.stream if msg is not None else getattr(error, "stream", None),
        "message_id": msg.id if msg is not None else getattr(error, "entry_id", None),
        "error_type": type(error).__name__,
    }
    logger.log(level, "%s", error, extra=extra)
