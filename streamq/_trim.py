"""Safe trimming: cap a stream's length without deleting entries a group still needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._transport import Transport

__all__ = ["TrimResult", "safe_trim", "safe_trim_point"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _successor(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


@dataclass(frozen=True, slots=True)
class TrimResult:
    """What a safe trim did.

    Attributes:
        stream: The stream.
        length_before: ``XLEN`` before trimming.
        deleted: Entries deleted.
        keep_from: The oldest entry ID some group still needs (``None``: no group
            needs anything, or the stream has no groups).
        limited_by_groups: Whether a group's unread or pending entries stopped the
            trim short of ``max_length``.
    """

    stream: str
    length_before: int
    deleted: int
    keep_from: str | None
    limited_by_groups: bool


async def safe_trim_point(transport: Transport, stream: str) -> str | None:
    """The oldest entry ID that some consumer group of ``stream`` has not finished with.

    For each group that is the oldest pending entry, or else the entry right after
    its last-delivered ID. ``None`` when no group needs anything (no groups, or all
    caught up with nothing pending: then the successor of the newest
    last-delivered ID is still returned so entries after it survive).
    """
    groups = await transport.execute("XINFO", "GROUPS", stream)
    needed: list[str] = []
    for raw in groups or ():
        info = {_text(raw[i]): raw[i + 1] for i in range(0, len(raw), 2)}
        name = _text(info["name"])
        need = _successor(_text(info["last-delivered-id"]))
        if int(info.get("pending", 0)):
            summary = await transport.execute("XPENDING", stream, name)
            if summary and summary[1] is not None:
                oldest = _text(summary[1])
                if _key(oldest) < _key(need):
                    need = oldest
        needed.append(need)
    if not needed:
        return None
    return min(needed, key=_key)


async def safe_trim(
    transport: Transport, stream: str, max_length: int, *, approximate: bool = False
) -> TrimResult:
    """Trim ``stream`` towards ``max_length`` entries, never past what a group still needs.

    Deletes the oldest ``XLEN - max_length`` entries, or fewer when some of them are
    unread by a group or pending in one (then ``limited_by_groups`` is True).

    Args:
        transport: Where to run the commands.
        stream: The stream.
        max_length: Entries to keep at least (those a group needs are always kept).
        approximate: Use ``~``, letting Redis trim in whole macro nodes (cheaper,
            may keep a few more).
    """
    length = int(await transport.execute("XLEN", stream))
    excess = length - max_length
    if excess <= 0:
        return TrimResult(stream, length, 0, None, False)
    keep_from = await safe_trim_point(transport, stream)
    # The newest entry that plain MAXLEN would delete.
    boundary = await transport.execute("XRANGE", stream, "-", "+", "COUNT", excess)
    cut = _successor(_text(boundary[-1][0])) if boundary else None
    limited = False
    if cut is None:
        return TrimResult(stream, length, 0, keep_from, False)
    if keep_from is not None and _key(keep_from) < _key(cut):
        cut, limited = keep_from, True
    args: list[Any] = ["XTRIM", stream, "MINID"]
    if approximate:
        args.append("~")
    args.append(cut)
    deleted = int(await transport.execute(*args))
    return TrimResult(stream, length, deleted, keep_from, limited)
