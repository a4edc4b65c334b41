"""Pruning: deleting the consumers of a group that are gone for good.

Consumer names come and go (one per pod, per deployment), and Redis keeps every
consumer a group ever saw until ``XGROUP DELCONSUMER``: ``XINFO CONSUMERS`` and
the tools built on it fill up with the dead. With ``prune_consumers_after > 0`` a
consumer deletes, now and then, the other consumers of its group that have been
idle that long and hold no pending entries.

``DELCONSUMER`` discards the pending entries of the consumer it deletes, so the
check and the delete run in one Lua script, atomically: a consumer that was
handed entries in between is not deleted, and no pending entry is ever dropped.
A consumer that was merely quiet is recreated by its next read. Consumers that
died holding entries are left to the claimer, which takes their entries over;
they are pruned on a later round, once they hold nothing.
"""

from __future__ import annotations

import asyncio
import logging

from ._errors import StreamqError, is_nogroup
from ._shared import Shared
from ._transport import Transport

__all__ = ["Pruner", "delete_idle_consumers"]

logger = logging.getLogger("streamq")

# KEYS[1]: the stream; ARGV: group, minimum idle time (ms), this consumer's name.
# Returns the names deleted. A missing stream or group prunes nothing: the
# reader recreates them and reports it.
_PRUNE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local rows = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if rows.err then
  if string.sub(rows.err, 1, 7) == 'NOGROUP' then return {} end
  return redis.error_reply(rows.err)
end
local idle = tonumber(ARGV[2])
local deleted = {}
for _, row in ipairs(rows) do
  local f = {}
  for i = 1, #row, 2 do f[row[i]] = row[i + 1] end
  if f['name'] ~= ARGV[3] and f['pending'] == 0 and f['idle'] >= idle then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    deleted[#deleted + 1] = f['name']
  end
end
return deleted
"""

# Rounds are housekeeping: at most this far apart, however long the idle limit.
_MAX_INTERVAL = 300.0


async def delete_idle_consumers(
    transport: Transport, stream: str, group: str, idle: float, keep: str = ""
) -> list[str]:
    """Delete the consumers of ``group`` idle ``idle`` seconds or more that hold nothing.

    One atomic script (see the module docs); ``keep`` is never deleted (the caller's
    own name). Returns the names deleted. Errors propagate unconverted.
    """
    reply = await transport.execute("EVAL", _PRUNE, 1, stream, group, round(idle * 1000), keep)
    return [name.decode(errors="replace") for name in reply or ()]


class Pruner:
    """Deletes idle consumers without pending entries from the group, periodically.

    Args:
        shared: The consumer's shared state.
    """

    def __init__(self, shared: Shared) -> None:
        self._shared = shared

    async def run(self) -> None:
        """Prune every subscribed stream's group every half ``prune_consumers_after``."""
        shared = self._shared
        interval = min(shared.options.prune_consumers_after / 2, _MAX_INTERVAL)
        await shared.started.wait()
        while True:
            for stream in list(shared.subs):
                await self.prune(stream)
            await asyncio.sleep(interval)

    async def prune(self, stream: str) -> list[str]:
        """One round on ``stream``; returns the names of the consumers deleted."""
        shared = self._shared
        opts = shared.options
        try:
            deleted = await shared.retry.call(
                f"prune consumers of {stream}",
                delete_idle_consumers,
                *(shared.transport, stream, opts.group, opts.prune_consumers_after, opts.consumer),
            )
        except StreamqError as exc:
            # Deleted under us between two commands of a round: nothing to prune.
            if exc.error is not None and is_nogroup(exc.error):
                return []
            raise
        for name in deleted:
            shared.counts["pruned"] += 1
            logger.info(
                "deleted consumer %r of group %r on %r: idle over %s s, nothing pending",
                name,
                opts.group,
                stream,
                opts.prune_consumers_after,
                extra={"stream": stream, "message_id": None, "error_type": None},
            )
        return deleted
