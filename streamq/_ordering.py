"""Per-key ordering: messages that share a key are handled one at a time, in stream order.

A subscription made with ``ordered_by_key=True`` names the field that carries
each message's key. When a message with a key is admitted (read, recovered or
claimed) while another message of the same key is still held by the consumer
(queued, running, or waiting for a retry), it is parked in that key's lane
instead of going to the workers. When the held one is finished for good (acked
after success or discard, or dead-lettered) the oldest parked message goes to
the workers. So a failing message blocks the later messages of its key until it
succeeds or is dead-lettered, which is what keeps their order; different keys
still run concurrently. Lanes are per stream, which is per partition for a
:class:`~streamq.PartitionedStream` (a key always maps to one partition).

Parked messages are held like queued ones: they count against ``buffer_size +
concurrency`` and are renewed, so no other consumer claims them. A message
waiting for its retry stays at the head of its lane (so its key stays blocked)
although it no longer counts against that capacity. Messages without the key
field are not ordered.
"""

from __future__ import annotations

from bisect import insort
from typing import Any

from ._message import Message

__all__ = ["KeyLanes"]


def _order(msg: Message) -> tuple[int, int]:
    ms, _, seq = msg.id.partition("-")
    return int(ms), int(seq or 0)


class KeyLanes:
    """The lanes of every ordered stream of one consumer.

    Attributes:
        fields: Ordered streams and the field holding their messages' keys.
    """

    __slots__ = ("_lanes", "fields")

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        # (stream, key) -> [the message being handled, then parked ones by ID].
        self._lanes: dict[tuple[str, Any], list[Message]] = {}

    def _lane_key(self, msg: Message) -> tuple[str, Any] | None:
        field = self.fields.get(msg.stream)
        if field is None:
            return None
        key = msg.values.get(field)
        if key is None:
            return None
        return msg.stream, key

    def admit(self, msg: Message) -> bool:
        """Whether ``msg`` may go to the workers now (else it was parked)."""
        lane_key = self._lane_key(msg)
        if lane_key is None:
            return True
        lane = self._lanes.get(lane_key)
        if lane is None:
            self._lanes[lane_key] = [msg]
            return True
        # Usually appended; a recovered or claimed entry older than the parked
        # ones goes before them (it cannot overtake the one already running).
        insort(lane, msg, lo=1, key=_order)
        return False

    def done(self, msg: Message) -> Message | None:
        """``msg`` is finished for good: return the next message of its key, if any."""
        lane_key = self._lane_key(msg)
        if lane_key is None:
            return None
        lane = self._lanes.get(lane_key)
        if lane is None:
            return None
        # By ID: a retried message comes back as a new Message (read again from
        # Redis) while the lane still starts with the one first admitted.
        if lane[0].id != msg.id:
            # Not the active one (should not happen): just forget it.
            for i in range(1, len(lane)):
                if lane[i] is msg:
                    del lane[i]
                    break
            return None
        return self._advance(lane_key, lane)

    def drop(self, stream: str, entry_id: str) -> Message | None:
        """The active message ``entry_id`` is gone (deleted while waiting for a retry).

        Like :meth:`done`, for when only its ID is known; scans the stream's lanes.
        """
        for lane_key, lane in self._lanes.items():
            if lane_key[0] == stream and lane[0].id == entry_id:
                return self._advance(lane_key, lane)
        return None

    def _advance(self, lane_key: tuple[str, Any], lane: list[Message]) -> Message | None:
        del lane[0]
        if lane:
            return lane[0]
        del self._lanes[lane_key]
        return None

    @property
    def parked(self) -> int:
        """Messages waiting behind an earlier message of their key."""
        return sum(len(lane) - 1 for lane in self._lanes.values())
