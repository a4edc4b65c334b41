"""Claiming: taking over what dead consumers left pending, and keeping what this one holds.

* The **claimer** takes over entries idle past ``pending_timeout`` (their consumer
  died) every ``claim_interval``, and this consumer's own entries whose read
  reply was lost with a broken connection (orphans).
* The **renewer** resets the idle time of every held entry every third of
  ``pending_timeout``, so that no other consumer claims what is merely waiting
  in the buffer or for a retry.
* The **lease keeper** of ordered streams (see ``_leases.py``) takes over, with
  every entry still pending elsewhere, the streams this consumer comes to own.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ._deliveries import Deliveries
from ._errors import StreamqError, convert, is_nogroup
from ._shared import Shared

__all__ = ["Claimer"]

_CLAIM_BATCH = 100
_RENEW_CHUNK = 500


class Claimer:
    """Claims idle entries, renews held ones, and takes over leased streams.

    Args:
        shared: The consumer's shared state.
        deliveries: Claims entries keeping their delivery counters.
        reading: The leased streams a reader is reading right now.
    """

    def __init__(self, shared: Shared, deliveries: Deliveries, reading: set[str]) -> None:
        self._shared = shared
        self._deliveries = deliveries
        self._reading = reading

    async def run(self) -> None:
        """Claim idle entries of every readable stream each ``claim_interval``."""
        shared = self._shared
        await shared.started.wait()
        while True:
            for stream in list(shared.subs):
                if not shared.leases.readable(stream):
                    continue  # its owner claims there
                try:
                    await self._claim(stream)
                    await self._claim(stream, orphans=True)
                except StreamqError as exc:
                    # The reader recreates a vanished group; claiming waits for it.
                    if exc.error is None or not is_nogroup(exc.error):
                        raise
            await asyncio.sleep(shared.options.claim_interval)

    async def renew(self) -> None:
        """Reset the idle time of every held entry, every third of ``pending_timeout``."""
        shared = self._shared
        opts = shared.options
        holding = shared.holding
        interval = opts.pending_timeout / 3
        await shared.started.wait()
        while True:
            await asyncio.sleep(interval)
            by_stream: dict[str, list[str]] = {}
            for stream, entry_id in [*holding.messages, *holding.waiting]:
                by_stream.setdefault(stream, []).append(entry_id)
            commands = [
                (
                    "XCLAIM",
                    stream,
                    opts.group,
                    opts.consumer,
                    0,
                    *ids[i : i + _RENEW_CHUNK],
                    "JUSTID",
                )
                for stream, ids in by_stream.items()
                for i in range(0, len(ids), _RENEW_CHUNK)
            ]
            if commands:
                await shared.transport.pipeline_retrying("XCLAIM JUSTID", commands, shared.retry)

    async def _claim(self, stream: str, *, orphans: bool = False) -> None:
        """Take over entries of ``stream`` idle longer than pending_timeout.

        With ``orphans``, take back this consumer's own pending entries that it does
        not hold: Redis delivered them, but the reply was lost with a broken or
        stalled connection, so nothing would handle them before pending_timeout.
        A delivered reply reaches us within command_timeout or its connection is
        dropped, so an unheld own entry idle longer than that is an orphan.
        """
        shared = self._shared
        holding = shared.holding
        opts = shared.options
        idle_ms = round(opts.pending_timeout * 1000)
        only: tuple[str, ...] = ()
        if orphans:
            if opts.command_timeout >= opts.pending_timeout:
                return  # the ordinary claim is as quick
            idle_ms, only = round(opts.command_timeout * 1000), (opts.consumer,)
        start = "-"
        while True:
            if holding.free() <= 0:
                return
            rows = await shared.retry.call(
                f"XPENDING {stream}",
                shared.transport.execute,
                *("XPENDING", stream, opts.group, "IDLE", idle_ms, start, "+", _CLAIM_BATCH, *only),
            )
            if not rows:
                return
            if only and shared.acker.pending:
                # Finished messages are released before Redis confirms their ack:
                # while acks are unconfirmed, an unheld entry may be one of them.
                return
            counts: dict[str, int] = {}
            for row in rows:
                entry_id = row[0].decode()
                if not holding.holds((stream, entry_id)):
                    counts[entry_id] = int(row[3])
            start = "(" + rows[-1][0].decode()
            # What is free now: others may have taken capacity during XPENDING.
            wanted = list(counts)[: max(holding.free(), 0)]
            if wanted:
                await self._take(stream, idle_ms, wanted, counts)
            if len(rows) < _CLAIM_BATCH:
                return

    async def _take(
        self, stream: str, idle_ms: int, wanted: list[str], counts: dict[str, int]
    ) -> None:
        """Claim ``wanted`` (idle at least ``idle_ms``) and hold them as suspects."""
        shared = self._shared
        holding = shared.holding
        # Reserved while the claim is in flight; turned into held entries below
        # without an await in between.
        holding.reserved += len(wanted)
        try:
            reply: list[Any] = await self._deliveries.claim(stream, idle_ms, wanted, counts)
        finally:
            holding.reserved -= len(wanted)
        claimed = set()
        for entry in reply:
            if entry is None:
                continue  # deleted (6.2 answers nil, 7.0+ omits it): gone() below
            raw_id, fields = entry
            entry_id = raw_id.decode()
            claimed.add(entry_id)
            if fields is None:
                shared.lost(stream, entry_id)
                continue
            msg = holding.make(stream, raw_id, fields, counts[entry_id])
            shared.counts["claimed"] += 1
            if msg is not None:
                holding.admit(msg)
                holding.suspects.add((stream, entry_id))
        for entry_id in wanted:
            if entry_id not in claimed:
                await shared.gone(stream, entry_id)

    # -- leases (ordered streams) -----------------------------------------------

    async def keep_leases(self) -> None:
        """Acquire, renew, balance and hand back the leases of the ordered streams."""
        shared = self._shared
        await shared.started.wait()
        await shared.leases.run(
            shared.transport, shared.retry, self._lease_busy, self._take_over, shared.report
        )

    def _lease_busy(self, stream: str) -> bool:
        """Whether this consumer still reads, or holds messages of, ``stream``."""
        holding = self._shared.holding
        return stream in self._reading or any(
            key[0] == stream for key in (*holding.messages, *holding.waiting)
        )

    async def _take_over(self, stream: str) -> None:
        """Claim every entry of a newly leased ``stream`` still pending for another consumer.

        They come before anything new in the stream (a crashed owner read them
        first), so the stream is read only after this.
        """
        shared = self._shared
        holding = shared.holding
        opts = shared.options
        start = "-"
        while True:
            rows = await shared.retry.call(
                f"XPENDING {stream}",
                shared.transport.execute,
                *("XPENDING", stream, opts.group, start, "+", _CLAIM_BATCH),
            )
            if not rows:
                return
            start = "(" + rows[-1][0].decode()
            counts = {
                row[0].decode(): int(row[3])
                for row in rows
                if row[1].decode() != opts.consumer and not holding.holds((stream, row[0].decode()))
            }
            waiting = list(counts)
            while waiting:
                free = await holding.wait_for_space()
                wanted, waiting = waiting[:free], waiting[free:]
                await self._take(stream, 0, wanted, counts)
            if len(rows) < _CLAIM_BATCH:
                return

    async def release_leases(self) -> None:
        """Hand the leases back at shutdown, so that others take over at once."""
        shared = self._shared
        if not shared.leases:
            return
        try:
            async with asyncio.timeout(shared.options.command_timeout):
                await shared.leases.release_all(shared.transport)
        except Exception as exc:
            # They expire after pending_timeout anyway.
            shared.report(convert(exc, "lease release"))
