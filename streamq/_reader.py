"""The reader: creates the groups, recovers this consumer's own pending entries, reads new ones.

One reader task per group of streams that one ``XREADGROUP`` may name together
(all of them on a single server, one hash slot's worth on a cluster). Each read
asks for no more than the free capacity of the consumer's :class:`Holding`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from ._capabilities import CONSUMER_COMMANDS, PRUNER_COMMANDS
from ._deliveries import Deliveries
from ._errors import GroupRecreatedError, StreamqError, is_nogroup
from ._message import Message
from ._shared import Shared

__all__ = ["Reader"]

# What a reader's streams gave last time (see Reader._read_group).
_IDLE, _ACTIVE, _DRAIN = "idle", "active", "drain"


class Reader:
    """Reads the subscribed streams into the consumer's holding.

    Args:
        shared: The consumer's shared state.
        deliveries: Resets the delivery counters of recovered entries.

    Attributes:
        reading: Leased streams that a reader is reading right now.
    """

    def __init__(self, shared: Shared, deliveries: Deliveries) -> None:
        self._shared = shared
        self._deliveries = deliveries
        self.reading: set[str] = set()

    async def run(self) -> None:
        """Create the groups, recover own pending entries, then read until cancelled."""
        shared = self._shared
        transport = shared.transport
        required: tuple[str, ...] = CONSUMER_COMMANDS
        if shared.options.prune_consumers_after > 0:
            required += PRUNER_COMMANDS
        await shared.retry.call("INFO", transport.server_info, required)
        await self._create_groups(shared.options.start_id, recreate=False)
        await self._recover_own_pending()
        # Claiming and renewing start only now, so that they never race the
        # recovery of this consumer's own pending entries.
        shared.started.set()
        groups = self._read_groups()
        total = sum(map(len, groups))
        if len(groups) == 1:
            await self._read_any(groups[0], 1, total)
            return
        try:
            async with asyncio.TaskGroup() as tg:
                for i, streams in enumerate(groups):
                    tg.create_task(
                        self._read_any(streams, len(groups), total), name=f"streamq-reader-{i}"
                    )
        except ExceptionGroup as group:
            raise group.exceptions[0] from None

    async def _create_groups(
        self, start_id: str, *, recreate: bool, streams: Iterable[str] | None = None
    ) -> None:
        shared = self._shared
        transport = shared.transport
        retry = shared.retry
        group = shared.options.group
        subs = shared.subs.values() if streams is None else [shared.subs[s] for s in streams]
        for sub in subs:
            position = start_id
            if recreate:
                # Resume after the last entry this consumer saw; on a stream that was
                # deleted (now empty) take everything that arrives from now on.
                length = await retry.call(
                    f"XLEN {sub.stream}", transport.execute, "XLEN", sub.stream
                )
                position = "0" if int(length) == 0 or sub.last_id is None else sub.last_id
            try:
                await retry.call(
                    f"XGROUP CREATE {sub.stream}",
                    transport.execute,
                    *("XGROUP", "CREATE", sub.stream, group, position, "MKSTREAM"),
                )
            except StreamqError as exc:
                if "BUSYGROUP" in str(exc.error):
                    continue
                raise
            if recreate:
                shared.report(
                    GroupRecreatedError(
                        f"consumer group {group!r} of stream {sub.stream!r} was missing "
                        f"(deleted group or stream); recreated at {position}"
                    )
                )

    def _read_groups(self) -> list[list[str]]:
        """The streams of each reader: one slot's worth (all, on a single server).

        At most ``capacity`` streams per reader, so that one entry of each fits.
        """
        shared = self._shared
        size = shared.holding.capacity
        return [
            streams[i : i + size]
            for streams in shared.transport.slot_groups(shared.subs)
            for i in range(0, len(streams), size)
        ]

    async def _read_any(self, streams: list[str], readers: int, total: int) -> None:
        if any(stream in self._shared.leases.exclusive for stream in streams):
            await self._read_leased(streams, readers, total)
        else:
            await self._read_group(streams, readers, total)

    async def _read_leased(self, streams: list[str], readers: int, total: int) -> None:
        """Read those of ``streams`` this consumer may read, restarting when that changes.

        A leased stream is read only while this consumer holds its lease. When
        ownership changes (rare: a consumer joined or left) the reader finishes its
        current read and starts over with the new set: a read cancelled in flight
        could leave entries delivered to nobody, which would come back out of order.
        """
        leases = self._shared.leases
        while True:
            changed = leases.changed
            active = [stream for stream in streams if leases.readable(stream)]
            if not active:
                await changed.wait()
                continue
            self.reading.update(active)
            try:
                await self._read_group(active, readers, total, until=changed)
            finally:
                self.reading.difference_update(active)

    async def _read_group(
        self, streams: list[str], readers: int, total: int, until: asyncio.Event | None = None
    ) -> None:
        """Read new entries of ``streams`` into the buffer until cancelled (or ``until``).

        Each read reserves the capacity it asks for (``COUNT`` applies per stream:
        ``m`` streams reserve ``m * count``), and a blocking read keeps it while it
        waits, so the size of a read follows what the streams had last time:

        * idle (the last blocking read timed out): block asking one entry per
          stream, so that idle streams tie up almost nothing;
        * active (entries came, fewer than asked): block asking a share of the
          capacity that leaves room for the other readers and the claimer;
        * draining (a stream gave all that was asked): ask for more without
          blocking, since entries are waiting.

        With more streams than half the capacity, reads block at most 0.1 s, so
        that quiet streams cannot hold the capacity that busy ones need for long.
        """
        shared = self._shared
        transport = shared.transport
        retry = shared.retry
        holding = shared.holding
        opts = shared.options
        capacity = holding.capacity
        m = len(streams)
        active_share = max(m, -(-capacity // (readers + 1)))
        drain_share = max(m, -(-capacity // readers))
        block_ms = round(opts.read_timeout * 1000)
        idle_ms = block_ms
        if total > capacity // 2 and not 0 < block_ms <= 100:
            idle_ms = block_ms = 100
        prefix = ["XREADGROUP", "GROUP", opts.group, opts.consumer, "COUNT"]
        keys = ["STREAMS", *streams, *([">"] * m)]
        subs = shared.subs
        nogroup_streak = 0
        mode = _IDLE
        while True:
            if until is not None and until.is_set():
                return
            if mode is _DRAIN:
                # Let the workers take (and fast handlers finish) what the last read
                # queued before this one is sized: with a backlog, reads then ask for
                # the whole free capacity rather than what was free mid-batch.
                await asyncio.sleep(0)
            free = await holding.wait_for_space(m)
            share = m if mode is _IDLE else active_share if mode is _ACTIVE else drain_share
            count = max(1, min(free, share) // m)
            reserved = count * m
            holding.reserved += reserved
            try:
                if mode is _DRAIN:
                    reply = await retry.call("XREADGROUP", transport.execute, *prefix, count, *keys)
                else:
                    ms = idle_ms if mode is _IDLE else block_ms
                    args = [*prefix, count, "BLOCK", ms, *keys]
                    reply = await retry.call("XREADGROUP", transport.blocking, args, ms / 1000)
            except StreamqError as exc:
                holding.reserved -= reserved
                holding.space.set()
                if exc.error is not None and is_nogroup(exc.error):
                    await asyncio.sleep(opts.backoff.for_attempt(nogroup_streak))
                    nogroup_streak += 1
                    await self._create_groups(opts.start_id, recreate=True, streams=streams)
                    mode = _IDLE
                    continue
                raise
            except BaseException:
                holding.reserved -= reserved
                raise
            # No await from here to the end of the admissions: the reservation turns
            # into held entries without anyone else seeing the capacity in between.
            holding.reserved -= reserved
            nogroup_streak = 0
            if not reply:
                mode = _ACTIVE if mode is _DRAIN else _IDLE
                holding.space.set()
                # Let readers waiting for space reserve before this one blocks again.
                await asyncio.sleep(0)
                continue
            mode = _ACTIVE
            got = 0
            for raw_stream, entries in reply:
                stream = raw_stream.decode()
                sub = subs[stream]
                holding.admit_entries(stream, entries)
                if entries:
                    last = entries[-1][0]
                    sub.last_id = last.decode() if isinstance(last, bytes) else str(last)
                    got += len(entries)
                    if len(entries) >= count:
                        mode = _DRAIN
            if got < reserved:
                holding.space.set()

    async def _recover_own_pending(self) -> None:
        """Re-deliver what this consumer read but never acked (e.g. before a crash)."""
        for streams in self._read_groups():
            await self._recover_group(streams)

    async def _recover_group(self, group: list[str]) -> None:
        shared = self._shared
        transport = shared.transport
        holding = shared.holding
        deliveries = self._deliveries
        opts = shared.options
        cursors = dict.fromkeys(group, "0")
        while cursors:
            # COUNT applies per stream. Nothing else reads or claims yet.
            free = await holding.wait_for_space(len(cursors)) // len(cursors)
            streams = list(cursors)
            args = [
                "XREADGROUP", "GROUP", opts.group, opts.consumer, "COUNT", free,
                "STREAMS", *streams, *(cursors[s] for s in streams),
            ]  # fmt: skip
            reply = await shared.retry.call("XREADGROUP 0", transport.execute, *args)
            got = {raw_stream.decode(): entries for raw_stream, entries in reply or ()}
            for stream in streams:
                entries = got.get(stream)
                if not entries:
                    del cursors[stream]
                    continue
                ids = [e[0].decode() for e in entries]
                cursors[stream] = ids[-1]
                counts = await deliveries.read(stream, ids[0], ids[-1], len(ids))
                # Re-reading counted a delivery, but no handler started: undo it.
                started = {i: max(n - 1, 1) for i, n in counts.items()}
                await deliveries.set(stream, started)
                recovered = []
                for (_, fields), entry_id in zip(entries, ids, strict=True):
                    if fields is None:
                        shared.lost(stream, entry_id)
                        continue
                    msg = holding.make(stream, entry_id.encode(), fields, started.get(entry_id, 1))
                    shared.counts["recovered"] += 1
                    if msg is not None:
                        recovered.append(msg)
                if stream not in holding.lanes.fields:
                    # Least-charged first: in a crash loop that strikes soon after
                    # each start, the entries first in line are the ones charged
                    # again, so they go to the back (in ID order among equals)
                    # instead of being charged by every crash until dead-lettered.
                    # Ordered streams keep ID order: it is their key order.
                    recovered.sort(key=_deliveries_of)
                for msg in recovered:
                    holding.admit(msg)
                    holding.suspects.add((stream, msg.id))


def _deliveries_of(msg: Message) -> int:
    return msg._deliveries
