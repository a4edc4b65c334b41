"""Coalesces XACKs: one pipelined round trip for everything finished since the last."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ._errors import NetworkError, StreamqError, convert, is_nogroup
from ._retry import NetworkRetry
from ._transport import Transport

__all__ = ["Acker"]

# Redis accepts any number of IDs per XACK; chunks keep one command's reply and
# memory small on huge bursts.
_CHUNK = 1000


class Acker:
    """Sends acknowledgements in batches.

    Handlers call :meth:`add` (synchronous, cheap) only after a message succeeded,
    was discarded or was dead-lettered; :meth:`run` sends whatever accumulated
    while the previous batch was in flight, so batches grow with load and a lone
    ack goes out at once. Nothing is ever acked that was not added.
    """

    def __init__(
        self,
        transport: Transport,
        group: str,
        retry: NetworkRetry,
        report: Callable[[StreamqError], None],
    ) -> None:
        self._transport = transport
        self._group = group
        self._retry = retry
        self._report = report
        self._pending: dict[str, list[str]] = {}
        self._count = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # Whether _wake is set and _idle clear for the acks added since the last
        # batch was taken: add() then skips both events (it runs once per message).
        self._signalled = False
        #: IDs whose XACK Redis confirmed.
        self.acked = 0

    def add(self, stream: str, entry_id: str) -> None:
        """Queue the ack of ``entry_id`` on ``stream``."""
        ids = self._pending.get(stream)
        if ids is None:
            self._pending[stream] = [entry_id]
        else:
            ids.append(entry_id)
        self._count += 1
        if not self._signalled:
            self._signalled = True
            self._idle.clear()
            self._wake.set()

    @property
    def pending(self) -> int:
        """Acks queued and not yet confirmed by Redis."""
        return self._count

    async def run(self) -> None:
        """Send batches until cancelled; on cancellation the unsent acks stay queued."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Send every queued ack now (retrying network errors as configured)."""
        while self._pending:
            batch = self._pending
            self._pending = {}
            self._signalled = False
            commands = [
                ("XACK", stream, self._group, *ids[i : i + _CHUNK])
                for stream, ids in batch.items()
                for i in range(0, len(ids), _CHUNK)
            ]
            try:
                replies = await self._transport.pipeline_retrying("XACK", commands, self._retry)
            except BaseException:
                # Put the batch back so that a final flush (or the error path) can
                # still see what was not confirmed.
                for stream, ids in batch.items():
                    self._pending.setdefault(stream, [])[:0] = ids
                raise
            sent = sum(len(ids) for ids in batch.values())
            self._count -= sent
            refused: StreamqError | None = None
            for cmd, reply in zip(commands, replies, strict=True):
                if isinstance(reply, Exception):
                    if is_nogroup(reply):
                        # The group vanished: nothing is pending there to ack. The
                        # reader recreates the group and reports it.
                        continue
                    err = convert(reply, f"XACK {cmd[1]}")
                    if isinstance(err, NetworkError):
                        # LOADING and the like, per command: those messages stay
                        # pending and come back (a duplicate, never a loss).
                        self._report(err)
                    elif refused is None:
                        refused = err
                else:
                    # Count what Redis confirmed, not its reply (entries it removed
                    # from the PEL): an earlier attempt cut off after sending (a lost
                    # reply, a cancelled flush) already removed them, and the resend
                    # then answers 0 for acks that did happen.
                    self.acked += len(cmd) - 3
            if refused is not None:
                # NOPERM, WRONGTYPE...: every later ack would be refused too, and a
                # consumer that cannot ack handles the same messages forever. Nothing
                # will be confirmed any more: release whoever waits for that.
                self._idle.set()
                raise refused
        self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until every queued ack was sent."""
        await self._idle.wait()
