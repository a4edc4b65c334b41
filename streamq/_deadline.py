"""The ``handler_timeout`` of a worker's handler calls, through ``asyncio.timeout``."""

from __future__ import annotations

import asyncio

__all__ = ["Deadline"]

# A timer may run a little before its time: asyncio's by up to the clock's
# resolution, uvloop's (millisecond timers) by up to a millisecond.
_TIMER_SLACK = 0.001


class Deadline:
    """The ``handler_timeout`` of one worker: an ``asyncio.timeout`` scope and a lazy timer.

    An ``asyncio.timeout(handler_timeout)`` around each handler call costs about
    4 us of CPU here (a Timeout object, its enter and exit coroutines, a
    TimerHandle pushed onto and cancelled from the loop's heap), and even
    ``asyncio.timeout(None)``, which schedules nothing, costs 1.8 us on Python
    3.11, against about 4 us for everything else a consumer does per message.

    So a worker keeps one ``asyncio.timeout(None)`` scope open across its handler
    calls, records when the running handler is due (``due``, 0 between handlers)
    and keeps at most one timer. When the timer fires it either re-arms itself for
    the handler running now (a busy worker arms about one timer per
    ``handler_timeout``, not one per message), or finds that handler overdue and
    reschedules the scope to its due time: ``asyncio.timeout`` itself then cancels
    the handler. The worker leaves that scope as soon as the handler ends
    (:meth:`renew`), where ``asyncio.timeout`` turns the cancellation into
    ``TimeoutError`` (or does not, when the consumer is being cancelled as well),
    and enters a fresh one. Between handler calls the scope never fires.
    """

    __slots__ = ("_loop", "due", "fired", "scope", "timer")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.due = 0.0
        self.fired = False
        self.scope: asyncio.Timeout | None = None
        self.timer: asyncio.TimerHandle | None = None

    async def open(self) -> None:
        """Enter a fresh scope (the worker calls this before its first handler)."""
        scope = asyncio.timeout(None)
        await scope.__aenter__()
        self.scope = scope

    def start(self, timeout: float) -> None:
        """A handler starts now and must finish within ``timeout`` seconds."""
        self.due = due = self._loop.time() + timeout
        if self.timer is None:
            self.timer = self._loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self.timer = None
        due = self.due
        if not due:
            return  # idle: the next handler arms a new timer
        loop = self._loop
        if due - loop.time() > _TIMER_SLACK:
            self.timer = loop.call_at(due, self._fire)  # a later handler is running
            return
        scope = self.scope
        if scope is not None:
            self.due = 0.0
            self.fired = True
            # Now, or within the timer's slack: asyncio.timeout cancels the handler.
            scope.reschedule(due)

    async def renew(self, exc: BaseException | None) -> bool:
        """Settle the scope after the handler its deadline fired on ended (with ``exc``).

        Returns:
            Whether the handler timed out: ``asyncio.timeout`` cancelled it and
            turned that cancellation (``exc``) into ``TimeoutError``.
        """
        self.fired = False
        scope = self.scope
        assert scope is not None  # fired only while a scope is open
        if not scope.expired():
            # The handler ended before asyncio.timeout acted: call it off.
            scope.reschedule(None)
            return False
        self.scope = None
        try:
            if exc is None:
                # It swallowed the cancellation: leaving withdraws our request.
                await scope.__aexit__(None, None, None)
            else:
                await scope.__aexit__(type(exc), exc, exc.__traceback__)
        except TimeoutError:
            return True
        finally:
            await self.open()
        return False

    async def close(self) -> None:
        """Drop the timer and leave the scope (the worker is ending)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        scope, self.scope = self.scope, None
        if scope is not None:
            await scope.__aexit__(None, None, None)
