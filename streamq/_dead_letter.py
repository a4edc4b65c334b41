"""The dead-letter entry: a message's fields plus metadata saying where it came from and why."""

from __future__ import annotations

import time
from typing import Any

from ._message import Message

__all__ = ["DEAD_FIELDS", "dead_letter_fields"]

# Metadata fields added to dead-lettered entries. The prefix keeps them apart from
# the application's own fields; `streamq replay` strips them.
DEAD_FIELDS = (
    "streamq-original-id",
    "streamq-original-stream",
    "streamq-group",
    "streamq-consumer",
    "streamq-deliveries",
    "streamq-error",
    "streamq-dead-at",
)


def dead_letter_fields(
    msg: Message,
    group: str,
    consumer: str,
    error: BaseException | None,
    raw_fields: list[Any] | None = None,
) -> list[Any]:
    """The flat field list (``XADD`` arguments) of ``msg``'s dead-letter entry.

    Args:
        msg: The message.
        group: The consumer group that gave up on it.
        consumer: The consumer that gave up on it.
        error: Why (its type and text go into ``streamq-error``).
        raw_fields: The entry's fields as Redis returned them, for an entry whose
            fields could not be decoded (``msg`` then has none).
    """
    fields: list[Any] = []
    if raw_fields is not None:
        fields.extend(raw_fields)
    else:
        for k, v in msg.values.items():
            fields.extend((k, v))
    error_text = "" if error is None else f"{type(error).__name__}: {error}"
    meta = (
        msg.id,
        msg.stream,
        group,
        consumer,
        msg.deliveries,
        error_text,
        f"{time.time():.3f}",
    )
    for name, value in zip(DEAD_FIELDS, meta, strict=True):
        fields.extend((name, value))
    return fields
