"""Partitioned streams: one logical stream split over N Redis streams.

Key names. Partition ``i`` of ``PartitionedStream("orders", partitions=N)`` is the
stream ``orders:p<i>:{<tag>}``: the name, the partition index, and a hash tag that
pins the key to a chosen Redis Cluster slot. The slots are spread evenly over the
16384 slots (partition ``i`` lands near slot ``i * 16384 / N``, offset by a hash
of the name so that different logical streams do not all share the same slots).
A cluster whose masters own equal contiguous slot ranges, which is what
``redis-cli --cluster create`` and ``CLUSTER ADDSLOTSRANGE`` by thirds produce,
therefore gets the partitions spread evenly over its masters: with N equal to
(or a multiple of) the number of masters, each master holds the same number.
The tag is the smallest decimal number whose CRC16 falls in the chosen slot, so
the names are a pure function of ``(name, N)``: every publisher and consumer
computes the same keys without asking Redis. On a single Redis the tags are
harmless. ``partitions=1`` uses ``name`` itself.

Choosing a partition. A message with a key goes to partition
``crc32(key) % N`` (UTF-8 bytes of a ``str`` key, the bytes of a ``bytes`` key,
the decimal text of an ``int``): the same key always lands in the same
partition, in every process and Python version. Changing N remaps keys, like
adding partitions to a Kafka topic. A message without a key goes round-robin.

The key travels in the entry itself, in the field ``key_field``
(``"streamq-key"`` by default), which is how a consumer with
``ordered_by_key=True`` finds it.
"""

from __future__ import annotations

import functools
import itertools
import zlib
from binascii import crc_hqx
from collections.abc import Mapping

from ._message import FieldValue, Message, validate_stream_name

__all__ = ["KEY_FIELD", "PartitionKey", "PartitionedStream", "slot_tag"]

KEY_FIELD = "streamq-key"
"""Default field that carries a message's partition key."""

PartitionKey = str | bytes | int
"""What a partition key may be."""

_SLOTS = 16384


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    # The smallest decimal number hashing to each slot; numbers up to ~110,000
    # cover all 16384 slots (about 40 ms, once per process).
    tags: list[str | None] = [None] * _SLOTS
    missing = _SLOTS
    for n in itertools.count():
        text = str(n)
        slot = crc_hqx(text.encode(), 0) % _SLOTS
        if tags[slot] is None:
            tags[slot] = text
            missing -= 1
            if not missing:
                break
    return tuple(t for t in tags if t is not None)


def slot_tag(slot: int) -> str:
    """A short hash tag (without braces) whose keys land in Redis Cluster ``slot``."""
    return _slot_tags()[slot]


def _key_bytes(key: PartitionKey) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key).encode()
    raise TypeError(f"key: expected a str, bytes or int, got {type(key).__name__}")


class PartitionedStream:
    """One logical stream split into ``partitions`` Redis streams.

    Publish with :meth:`message` (it picks the partition), and subscribe a
    consumer to the whole thing with ``consumer.subscribe(orders, handler)``;
    add ``ordered_by_key=True`` to handle the messages of one key one at a time,
    in publish order. See the module documentation for the key names.

    Example::

        orders = PartitionedStream("orders", partitions=8)
        await publisher.publish(orders.message({"total": "9.90"}, key="user-42"))
        consumer.subscribe(orders, handle_order, ordered_by_key=True)

    Args:
        name: The logical name; the partitions' keys start with it. It must not
            contain ``{`` or ``}`` (a hash tag in it would pin every partition to
            one slot).
        partitions: How many streams (at least 1). Changing it later sends keys
            to different partitions.
        key_field: The entry field carrying the partition key.

    Raises:
        TypeError, ValueError: An argument is invalid (the message names it).
    """

    __slots__ = ("_rr", "key_field", "keys", "name", "partitions")

    def __init__(self, name: str, partitions: int, *, key_field: str = KEY_FIELD) -> None:
        validate_stream_name(name, "name")
        if "{" in name or "}" in name:
            raise ValueError(
                f"name: {name!r} contains '{{' or '}}'; a hash tag in the name would put "
                "every partition in the same cluster slot"
            )
        if isinstance(partitions, bool) or not isinstance(partitions, int):
            raise TypeError(f"partitions: expected an int, got {type(partitions).__name__}")
        if partitions < 1:
            raise ValueError(f"partitions: must be >= 1, got {partitions}")
        validate_stream_name(key_field, "key_field")
        self.name = name
        self.partitions = partitions
        self.key_field = key_field
        self.keys: tuple[str, ...] = self._make_keys()
        self._rr = itertools.count()

    def _make_keys(self) -> tuple[str, ...]:
        n = self.partitions
        if n == 1:
            return (self.name,)
        # A fraction in [0.1, 0.9) of a slot stride, from the name: partitions of
        # different streams use different slots, yet keep clear of the range
        # boundaries (which tools round differently by one slot).
        offset = 0.1 + 0.8 * ((zlib.crc32(self.name.encode()) % 10007) / 10007)
        stride = _SLOTS / n
        return tuple(
            f"{self.name}:p{i}:{{{slot_tag(int(stride * (i + offset)) % _SLOTS)}}}"
            for i in range(n)
        )

    def partition_of(self, key: PartitionKey) -> int:
        """The partition index of ``key``: ``crc32(key) % partitions``."""
        return zlib.crc32(_key_bytes(key)) % self.partitions

    def stream_for(self, key: PartitionKey | None = None) -> str:
        """The Redis stream of ``key``, or the next one round-robin when ``key`` is None."""
        if key is None:
            return self.keys[next(self._rr) % self.partitions]
        return self.keys[self.partition_of(key)]

    def message(
        self,
        values: Mapping[str, FieldValue],
        *,
        key: PartitionKey | None = None,
        id: str = "*",
    ) -> Message:
        """Build a :class:`~streamq.Message` for the partition of ``key``.

        Args:
            values: The message's fields.
            key: The partition key, stored in ``key_field``. Without it the key is
                taken from ``values[key_field]`` if present, else the partition is
                chosen round-robin (and the message has no ordering key).
            id: As for :class:`~streamq.Message`.

        Raises:
            TypeError, ValueError: ``values``, ``key`` or ``id`` is invalid.
        """
        if key is None:
            found = values.get(self.key_field) if isinstance(values, Mapping) else None
            if found is not None and not isinstance(found, float):
                key = found
        elif not isinstance(key, str | bytes | int) or isinstance(key, bool):
            raise TypeError(f"key: expected a str, bytes or int, got {type(key).__name__}")
        else:
            values = {**values, self.key_field: key}
        return Message(self.stream_for(key), values, id)

    def key_of(self, msg: Message) -> str | None:
        """The partition key of a received message, as text (``None`` if it has none)."""
        value = msg.values.get(self.key_field)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def __contains__(self, stream: object) -> bool:
        return stream in self.keys

    def __repr__(self) -> str:
        return f"PartitionedStream({self.name!r}, partitions={self.partitions})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PartitionedStream):
            return NotImplemented
        return (self.name, self.partitions, self.key_field) == (
            other.name,
            other.partitions,
            other.key_field,
        )

    def __hash__(self) -> int:
        return hash((self.name, self.partitions, self.key_field))
