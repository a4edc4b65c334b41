"""What the server can do: detected once per connection, from its name and version.

Three engines are tested (Redis 6.2, Redis 7.0, Valkey 8.1) and their stream
commands differ in ways streamq cares about:

* **Deleted entries in claims.** On Redis 6.2, ``XCLAIM``/``XAUTOCLAIM`` answer a
  deleted (trimmed) pending entry with a nil element and keep it in the pending
  list, claimed to the caller. From Redis 7.0 (and on every Valkey) they omit it and
  drop it from the pending list; ``XAUTOCLAIM`` then lists its ID in a third reply
  element. The consumer accepts both shapes, so this flag documents rather than
  steers it; see :attr:`Capabilities.claim_drops_deleted`.
* **Group lag.** ``XINFO GROUPS`` reports ``entries-read`` and ``lag`` from 7.0 on.

Version numbers lie across forks: Valkey 8.1 reports ``valkey_version:8.1.x`` but
implements the Redis 7.2 command set, which it states in ``redis_version:7.2.4``.
So features are derived from that Redis *compatibility* version, never from a
fork's own numbers (a Valkey 8.2 has no Redis 8.2 XACKDEL). What a server lacks for
good (a command renamed away, a fork that never had it) is probed with one
``COMMAND INFO`` round trip, so that a missing command is refused at start with its
name instead of failing later with ``ERR unknown command``.

Adding a newer feature (Redis 8.2 ``XACKDEL``, 8.4 ``XREADGROUP ... CLAIM``, 8.6
idempotent ``XADD``, 8.8 ``XNACK``) is internal and leaves the public API alone:
add a flag to :class:`Capabilities`, derive it in :func:`capabilities_for` from the
compatibility version (or add the command to the probe), and branch on it where the
command is built, together with a test on an engine that has it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._errors import UnsupportedServerError, is_network_error

__all__ = [
    "CONSUMER_COMMANDS",
    "MIN_VERSION",
    "PRUNER_COMMANDS",
    "Capabilities",
    "ServerInfo",
    "capabilities_for",
    "detect",
    "missing_commands",
    "parse_server_info",
    "require_commands",
]

# Oldest server streamq can run on: XPENDING IDLE, exclusive ranges and XTRIM MINID
# came in 6.2.
MIN_VERSION = (6, 2)

#: Every command an AsyncConsumer sends (the dead-letter stream needs XADD).
CONSUMER_COMMANDS = ("XACK", "XADD", "XCLAIM", "XGROUP", "XLEN", "XPENDING", "XRANGE", "XREADGROUP")

#: What a consumer with ``prune_consumers_after`` sends besides.
PRUNER_COMMANDS = ("EVAL", "EXISTS", "XINFO")


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Behaviours that differ between the servers streamq supports.

    Attributes:
        claim_drops_deleted: ``XCLAIM``/``XAUTOCLAIM`` skip entries deleted from the
            stream and remove them from the pending list (Redis >= 7.0, Valkey).
            When false (Redis 6.2) they answer nil for such an entry and keep it
            pending, so the claimer must acknowledge it itself.
        group_lag: ``XINFO GROUPS`` reports ``entries-read`` and ``lag`` (Redis >= 7.0).
    """

    claim_drops_deleted: bool
    group_lag: bool


def capabilities_for(compat_version: tuple[int, ...]) -> Capabilities:
    """Capabilities of a server implementing the Redis ``compat_version`` command set."""
    v7 = compat_version >= (7, 0)
    return Capabilities(claim_drops_deleted=v7, group_lag=v7)


def _parse_version(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _version_text(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version)) or "unknown"


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What a server said about itself, and what streamq concluded from it.

    Attributes:
        name: ``"redis"`` or ``"valkey"`` (or whatever the server reports).
        version: The server's own version, e.g. ``(7, 0, 15)`` or Valkey's ``(8, 1, 8)``.
        compat_version: The Redis version whose command set it implements: the
            same as ``version`` for Redis, ``redis_version`` for forks (Valkey 8.1
            says ``(7, 2, 4)``). Features are derived from this one.
        capabilities: What the server can do (see :class:`Capabilities`).
    """

    name: str
    version: tuple[int, ...]
    compat_version: tuple[int, ...] = ()
    capabilities: Capabilities = field(default_factory=lambda: capabilities_for(()))

    @property
    def version_text(self) -> str:
        """The version as ``"7.0.15"``."""
        return _version_text(self.version)

    @property
    def description(self) -> str:
        """E.g. ``"Redis 7.0.15"`` or ``"Valkey 8.1.8 (Redis 7.2.4 compatible)"``."""
        text = f"{self.name.capitalize()} {self.version_text}"
        if self.compat_version and self.compat_version != self.version:
            text += f" (Redis {_version_text(self.compat_version)} compatible)"
        return text


def parse_server_info(raw: Any) -> ServerInfo:
    """Build a :class:`ServerInfo` from an ``INFO server`` reply (bytes or str)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    fields = dict(
        line.split(":", 1) for line in text.splitlines() if ":" in line and line[0] != "#"
    )
    name = fields.get("server_name", "redis").strip() or "redis"
    redis_version = _parse_version(fields.get("redis_version", "").strip())
    own = fields.get(f"{name}_version", "").strip()
    version = _parse_version(own) if own else redis_version
    compat = redis_version or version
    return ServerInfo(name, version, compat, capabilities_for(compat))


def _require_min_version(info: ServerInfo) -> None:
    # An empty version (a server that hides it) is given the benefit of the doubt;
    # the command probe still catches what it lacks.
    if info.compat_version and info.compat_version < MIN_VERSION:
        raise UnsupportedServerError(
            f"{info.description} is too old: streamq needs Redis >= 6.2 "
            "(XPENDING IDLE, XTRIM MINID, XAUTOCLAIM)"
        )


async def missing_commands(
    execute: Callable[..., Awaitable[Any]], commands: Iterable[str]
) -> list[str]:
    """The ``commands`` the server does not know (renamed away or never implemented).

    One ``COMMAND INFO`` round trip: unknown commands come back as nil. A server or
    ACL user that refuses ``COMMAND`` itself yields ``[]``: the probe is a courtesy,
    and the command's own error remains the fallback.
    """
    names = list(commands)
    try:
        reply = await execute("COMMAND", "INFO", *names)
    except Exception as exc:
        # NOPERM (an ACL without +command) or a server without COMMAND; network
        # errors are the caller's to retry.
        if is_network_error(exc):
            raise
        return []
    if not isinstance(reply, list) or len(reply) != len(names):
        return []
    return [name for name, entry in zip(names, reply, strict=True) if entry is None]


async def detect(execute: Callable[..., Awaitable[Any]]) -> ServerInfo:
    """Ask the server what it is (``INFO server``), refusing one older than Redis 6.2.

    Args:
        execute: Sends one command and returns its raw reply.

    Raises:
        UnsupportedServerError: The server is older than Redis 6.2 (the message
            names the server and its version).
    """
    info = parse_server_info(await execute("INFO", "server"))
    _require_min_version(info)
    return info


async def require_commands(
    execute: Callable[..., Awaitable[Any]], info: ServerInfo, commands: Sequence[str]
) -> None:
    """Refuse a server that lacks any of ``commands``, naming them.

    Raises:
        UnsupportedServerError: Some of ``commands`` are unknown to the server.
    """
    missing = await missing_commands(execute, commands)
    if missing:
        raise UnsupportedServerError(
            f"{info.description} does not know {', '.join(missing)} (renamed or "
            f"disabled with rename-command?); streamq needs {', '.join(commands)}"
        )
