"""The Message type: one Redis stream entry, to publish or as received."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeAlias

__all__ = ["FieldValue", "Message", "validate_stream_name", "validate_values"]

FieldValue: TypeAlias = str | bytes | int | float
"""What a field of a message may hold when publishing.

Received messages hold ``bytes`` (Redis stores every value as a string of bytes).
"""

# An explicit ID is ``ms-seq``; ``ms-*`` asks Redis to pick the sequence number.
_ID_RE = re.compile(r"^\d+(-(\d+|\*))?$")


class Message:
    """One entry of a Redis stream.

    Build one to publish with ``Message(stream, values)``; the ID Redis assigns is
    written back into ``id`` by the publisher. Received messages also carry
    ``deliveries`` (Redis' delivery counter for this group, 1 on first delivery)
    and ``retry_count`` (``deliveries - 1``).

    Args:
        stream: The stream's key.
        values: A flat mapping of field name to ``str``/``bytes``/``int``/``float``.
            Received messages hold ``bytes`` values.
        id: ``"*"`` (let Redis choose, the usual case) or an explicit ``ms-seq`` ID.

    Raises:
        ValueError: ``stream`` is empty, ``values`` is empty, or ``id`` is malformed.
        TypeError: A field name is not a ``str`` or a value has an unsupported type.
    """

    __slots__ = ("_deliveries", "id", "stream", "values")

    stream: str
    values: dict[str, FieldValue]
    id: str

    def __init__(self, stream: str, values: Mapping[str, FieldValue], id: str = "*") -> None:
        validate_stream_name(stream, "stream")
        self.stream = stream
        self.values = validate_values(values)
        if not id:
            id = "*"
        if id != "*" and not _ID_RE.match(id):
            raise ValueError(f"id: {id!r} is not a stream ID ('*', 'ms-seq' or 'ms-*')")
        self.id = id
        self._deliveries = 0

    @classmethod
    def _received(
        cls, stream: str, id: str, values: dict[str, FieldValue], deliveries: int
    ) -> Message:
        # Entries read from Redis are well-formed by construction; skipping
        # validation keeps the read path cheap.
        msg = object.__new__(cls)
        msg.stream = stream
        msg.id = id
        msg.values = values
        msg._deliveries = deliveries
        return msg

    @property
    def deliveries(self) -> int:
        """How many times Redis delivered this entry to the group (0 if never received)."""
        return self._deliveries

    @property
    def retry_count(self) -> int:
        """How many times this message was delivered before: ``deliveries - 1``, at least 0."""
        return max(self._deliveries - 1, 0)

    def text(self, field: str, default: str | None = None) -> str:
        """Return a field decoded as UTF-8 text.

        Args:
            field: The field name.
            default: Returned when the field is absent; without it a ``KeyError`` is raised.

        Raises:
            KeyError: The field is absent and no default was given.
            UnicodeDecodeError: The value is not valid UTF-8.
        """
        try:
            value = self.values[field]
        except KeyError:
            if default is None:
                raise
            return default
        if isinstance(value, bytes):
            return value.decode("utf-8")
        return str(value)

    def __repr__(self) -> str:
        return (
            f"Message(stream={self.stream!r}, id={self.id!r}, "
            f"deliveries={self._deliveries}, values={self.values!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.stream, self.id, self.values) == (other.stream, other.id, other.values)

    __hash__ = None  # type: ignore[assignment]  # mutable: id is written back on publish


def validate_stream_name(name: object, field: str) -> None:
    """Raise a clear error unless ``name`` is a non-empty ``str``."""
    if not isinstance(name, str):
        raise TypeError(f"{field}: expected a str, got {type(name).__name__}")
    if not name:
        raise ValueError(f"{field}: must not be empty")


def validate_values(values: object) -> dict[str, FieldValue]:
    """Check a message's fields before anything is sent and return them as a dict.

    Raises:
        TypeError: ``values`` is not a mapping, a name is not a ``str``, or a value
            is not ``str``/``bytes``/``int``/``float`` (``bool`` and ``None`` are refused:
            Redis would store them as text that does not round-trip).
        ValueError: ``values`` is empty or a field name is empty.
    """
    if not isinstance(values, Mapping):
        raise TypeError(
            f"values: expected a mapping of field to value, got {type(values).__name__}"
        )
    if not values:
        raise ValueError("values: a stream entry needs at least one field")
    out: dict[str, FieldValue] = {}
    for name, value in values.items():
        if not isinstance(name, str):
            raise TypeError(f"values: field name {name!r} must be a str")
        if not name:
            raise ValueError("values: field names must not be empty")
        if isinstance(value, bool) or not isinstance(value, str | bytes | int | float):
            raise TypeError(
                f"values[{name!r}]: {type(value).__name__} is not supported; "
                "use str, bytes, int or float"
            )
        out[name] = value
    return out
