"""Idempotent publishing: a retried XADD whose first attempt was stored is not stored again.

When a connection breaks after an ``XADD`` was sent but before its reply came
back, nobody knows whether Redis stored the entry; resending it blindly stores
it twice, with two IDs (redis-py #3554). With ``PublisherOptions(idempotent=True)``
every entry carries a field :data:`FIELD` whose value is unique to that publish
(a random publisher ID and a sequence number). Before a retry resends anything,
:func:`find_stored` looks for those values at the end of each stream: what is
found was stored by the lost attempt and gets its ID back; only the rest is sent
again.

Nothing is read on the common path: the search runs only after a failure, and
only over the entries added since the first attempt (their IDs are Redis'
millisecond clock). Redis 8.6's own ``XADD ... IDMP`` does the same inside the
server; no engine tested here has it yet.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from ._transport import Transport

__all__ = ["FIELD", "Tagger", "find_stored"]

FIELD = "streamq-publish-id"
"""The field that carries a publish's unique value."""

_FIELD_BYTES = FIELD.encode()

# Entries per XREVRANGE page while searching.
_PAGE = 1000

# Added to the search window: entry IDs come from Redis' clock, the window's
# length from ours, and the two tick apart (and a clock may step).
_SLACK_MS = 2000


class Tagger:
    """Hands out the unique values of one publisher's entries."""

    __slots__ = ("_prefix", "_seq")

    def __init__(self) -> None:
        # 64 random bits: two publishers colliding is as likely as a UUID clash.
        self._prefix = secrets.token_hex(8) + "-"
        self._seq = 0

    def next(self) -> str:
        """A value no other publish (of any publisher) carries."""
        self._seq += 1
        return f"{self._prefix}{self._seq}"


async def find_stored(
    transport: Transport,
    wanted: Sequence[tuple[str, str, str]],
    elapsed: float,
) -> dict[int, str]:
    """Find which of ``wanted`` are already in Redis.

    Args:
        transport: Where to look (one command at a time; errors propagate, so
            the caller's retry covers the search too).
        wanted: Per entry ``(stream, id, tag)``: ``id`` is ``"*"`` or the explicit
            ID the entry was sent with, ``tag`` its :data:`FIELD` value.
        elapsed: Seconds since the first attempt to store them was made.

    Returns:
        Index in ``wanted`` -> stored entry ID, for those found.
    """
    found: dict[int, str] = {}
    by_stream: dict[str, dict[bytes, int]] = {}
    for index, (stream, entry_id, tag) in enumerate(wanted):
        if entry_id != "*":
            # An explicit ID says where to look, however old it is.
            reply = await transport.execute("XRANGE", stream, entry_id, entry_id)
            if reply and _tag_of(reply[0][1]) == tag.encode():
                found[index] = entry_id
            continue
        by_stream.setdefault(stream, {})[tag.encode()] = index
    window_ms = int(elapsed * 1000) + _SLACK_MS
    for stream, tags in by_stream.items():
        await _search(transport, stream, tags, window_ms, found)
    return found


async def _search(
    transport: Transport,
    stream: str,
    tags: dict[bytes, int],
    window_ms: int,
    found: dict[int, str],
) -> None:
    """Walk ``stream`` back from its newest entry for ``window_ms``, collecting ``tags``."""
    end: Any = "+"
    oldest_ms: int | None = None
    while tags:
        page = await transport.execute("XREVRANGE", stream, end, "-", "COUNT", _PAGE)
        if not page:
            return
        for raw_id, fields in page:
            ms = int(raw_id.split(b"-", 1)[0])
            if oldest_ms is None:
                # Anything the lost attempt stored is at most window_ms older than
                # the newest entry, whose ID is Redis' clock now (or later).
                oldest_ms = ms - window_ms
            if ms < oldest_ms:
                return
            tag = _tag_of(fields)
            if tag is not None:
                index = tags.pop(tag, None)
                if index is not None:
                    found[index] = raw_id.decode()
                    if not tags:
                        return
        if len(page) < _PAGE:
            return
        end = b"(" + page[-1][0]


def _tag_of(fields: Sequence[Any] | None) -> bytes | None:
    if not fields:
        return None
    # streamq appends the tag last; look there before scanning the rest.
    if len(fields) >= 2 and fields[-2] == _FIELD_BYTES:
        tag: bytes = fields[-1]
        return tag
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == _FIELD_BYTES:
            value: bytes = fields[i + 1]
            return value
    return None
