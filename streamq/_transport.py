"""streamq's own connections to Redis, and the one place that talks to redis-py.

Why streamq does not send its commands through the client it is given:

* redis-py 8 retries every command by itself (10 times, with its own backoff), so
  a second retry layer on top multiplies attempts and hides outages. streamq owns
  retrying (through tenacity, in ``_retry.py``) and disables redis-py's.
* A blocking ``XREADGROUP`` must not trip the client's socket timeout, and a
  cancelled blocking read must never go back into a pool with an unread reply.
  streamq gives the read its own connection and its own deadline.
* Replies are parsed by streamq (RESP2, undecoded), so the client's
  ``decode_responses`` setting cannot corrupt binary payloads.
* Speed: redis-py 8 spends 50-60 us of CPU per command here (argument encoding,
  pool bookkeeping, a task per send under ``socket_timeout``). streamq encodes
  commands itself (``_resp.py``), keeps a free list of its own connections, and
  bounds each round trip with one ``asyncio.timeout``: 3-4x less CPU per command.

So a :class:`Transport` clones the connection settings of the user's client
(host, port, password, TLS, ...) into a pool of its own. The user's client is
never closed or reconfigured; a client built from a URL is closed on ``aclose()``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.client import CaseInsensitiveDict
from redis.exceptions import ResponseError

from ._capabilities import ServerInfo, detect, require_commands
from ._errors import is_network_error
from ._resp import pack_commands

if TYPE_CHECKING:
    from ._retry import NetworkRetry

__all__ = ["ServerInfo", "Transport", "open_transport"]

Command = Sequence[Any]

# Idle connections kept for reuse; more are opened while more commands are in
# flight at once, and closed when they come back to a full free list.
_MAX_IDLE = 16
# Round trips in flight at once (one connection each); more wait for a turn
# instead of opening connections without bound (or failing, as redis-py's
# pool does beyond its max_connections).
_MAX_IN_FLIGHT = 64


_POOL_OWNED = (
    "connection_pool",
    "maint_notifications_pool_handler",
    "maint_notifications_config",
    "oss_cluster_maint_notifications_handler",
    "orig_host_address",
    "orig_socket_timeout",
    "orig_socket_connect_timeout",
    "himport_registry",
)


# Slack a blocking read gets beyond its block time, however small command_timeout
# is: Redis answers a timed-out BLOCK on its next timer tick, up to 1/hz (100 ms
# by default) late, and more on a busy server.
_BLOCK_SLACK = 1.0

# Failures of a connection (not of a command): the other idle ones are suspect too.
_CONNECTION_FAILURES = (rex.ConnectionError, rex.TimeoutError, OSError)


def _closed_by_peer(conn: AbstractConnection) -> bool:
    """Whether the server already closed this idle connection (seen as EOF on it).

    Cheap enough for every reuse, unlike redis-py's pool, which probes each
    connection it hands out with a read attempt.
    """
    reader = getattr(conn, "_reader", None)  # redis-py's asyncio StreamReader
    return isinstance(reader, asyncio.StreamReader) and reader.at_eof()


class Transport:
    """Commands to one standalone Redis (or Valkey) server, on connections streamq owns.

    Args:
        client: The user's client; its connection settings are copied.
        owned: Whether ``client`` was built by streamq (then it is closed too).
        command_timeout: Seconds to wait for the answer to a non-blocking command.
    """

    def __init__(self, client: aioredis.Redis, *, owned: bool, command_timeout: float) -> None:
        self._user_client = client
        self._owned = owned
        self.command_timeout = command_timeout
        source = client.connection_pool
        kwargs = dict(source.connection_kwargs)
        kwargs.update(
            # One retry layer: ours. redis-py's Retry(…, 0) makes exactly one attempt.
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            retry_on_error=[],
            protocol=2,
            decode_responses=False,
            socket_timeout=command_timeout,
        )
        connect_timeout = kwargs.get("socket_connect_timeout")
        if connect_timeout is None or connect_timeout > command_timeout:
            kwargs["socket_connect_timeout"] = command_timeout
        # State that a pool injects into its own connections' kwargs; the new pool
        # builds its own (maintenance notifications need RESP3, which streamq avoids).
        for key in _POOL_OWNED:
            kwargs.pop(key, None)
        self.pool = ConnectionPool(connection_class=source.connection_class, **kwargs)
        self.client = aioredis.Redis(connection_pool=self.pool)
        # Raw replies: streamq parses them itself, cheaply and independent of the
        # redis-py version's reply shapes.
        self.client.response_callbacks = CaseInsensitiveDict({})
        self._blocking: AbstractConnection | None = None
        self._idle: list[AbstractConnection] = []
        self._turns = asyncio.Semaphore(_MAX_IN_FLIGHT)
        self._closed = False
        encoder = self.pool.get_encoder()  # type: ignore[no-untyped-call]
        self._encoding: str = encoder.encoding
        self._encoding_errors: str = encoder.encoding_errors
        self.server: ServerInfo | None = None
        self._checked: set[str] = set()

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its raw (RESP2, undecoded) reply.

        Raises:
            redis.exceptions.ResponseError: Redis answered with an error.
        """
        [reply] = await self._round_trip([args])
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Command]) -> list[Any]:
        """Send commands in one round trip; per-command errors are returned, not raised.

        A connection failure raises (the whole batch may or may not have run).
        """
        if not commands:
            return []
        return await self._round_trip(commands)

    async def _round_trip(self, commands: Sequence[Command]) -> list[Any]:
        """Write ``commands`` at once on a free connection and read one reply for each.

        The whole exchange (connecting included) must finish within
        ``command_timeout``. A connection that failed, timed out or was cancelled
        mid-exchange may hold half a reply: it is closed, never reused.
        """
        packed = pack_commands(commands, self._encoding, self._encoding_errors)
        await self._turns.acquire()
        try:
            return await self._exchange(packed, len(commands))
        finally:
            self._turns.release()

    async def _exchange(self, packed: bytes, count: int) -> list[Any]:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not _closed_by_peer(conn):
                break
            # The server closed it while it sat idle (timeout, CLIENT KILL, restart).
            await conn.disconnect(nowait=True)
        else:
            conn = self._new_connection()
        replies: list[Any] = []
        try:
            async with asyncio.timeout(self.command_timeout):
                await conn.send_packed_command(packed, check_health=False)
                for _ in range(count):
                    try:
                        replies.append(await conn.read_response())
                    except ResponseError as exc:
                        replies.append(exc)
        except BaseException as exc:
            await conn.disconnect(nowait=True)
            if isinstance(exc, _CONNECTION_FAILURES):
                # Whatever broke this one (a restart, a failover, a network cut)
                # most likely broke the idle ones too: the retry starts afresh.
                idle, self._idle = self._idle, []
                for stale in idle:
                    await stale.disconnect(nowait=True)
            raise
        idle = self._idle  # not the local one: a failure elsewhere may have replaced it
        if self._closed or len(idle) >= _MAX_IDLE:
            # After aclose() commands still work (as with redis-py's pool), but
            # leave nothing open behind them.
            await conn.disconnect(nowait=True)
        else:
            idle.append(conn)
        return replies

    def _new_connection(self) -> AbstractConnection:
        conn: AbstractConnection = self.pool.make_connection()  # type: ignore[no-untyped-call]
        # The round trip's own asyncio.timeout bounds it; a socket_timeout would
        # make redis-py wrap every send in asyncio.wait_for (a task per send).
        conn.socket_timeout = None
        return conn

    async def pipeline_retrying(
        self,
        what: str,
        commands: Sequence[Command],
        retry: NetworkRetry,
        *,
        resend_refused: bool = False,
    ) -> list[Any]:
        """:meth:`pipeline` under ``retry`` (a cluster retries each master's part alone).

        Args:
            what: What is being done, for error texts.
            commands: The commands.
            retry: The retry policy.
            resend_refused: Also retry the commands that Redis refused with a
                transient error, and once retries run out return what ran, the
                rest holding the error (see :func:`send_retrying`).
        """
        return await send_retrying(what, commands, retry, self.pipeline, resend_refused)

    def slot_groups(self, streams: Iterable[str]) -> list[list[str]]:
        """Streams that one multi-key command may name together: all of them here."""
        return [list(streams)]

    async def blocking(self, args: Command, block: float) -> Any:
        """Run a blocking command (``XREADGROUP ... BLOCK``) on a dedicated connection.

        Args:
            args: The command.
            block: The command's own block time in seconds (0: forever). The reply
                is awaited that long plus ``command_timeout`` (at least 1 s); a
                reply that takes longer means a stalled connection, which is dropped.

        Raises:
            TimeoutError: The server did not answer in time.
        """
        conn = self._blocking
        if conn is None:
            conn = self._blocking = self._new_connection()
        deadline = None if block == 0 else block + max(self.command_timeout, _BLOCK_SLACK)
        packed = pack_commands([args], self._encoding, self._encoding_errors)
        try:
            # read_response(timeout=...) returns None on expiry and keeps the
            # connection, whose reply is then still in flight. asyncio.timeout
            # cancels the read instead, and a cancelled read disconnects.
            async with asyncio.timeout(deadline):
                await conn.send_packed_command(packed, check_health=False)
                return await conn.read_response(timeout=math.inf)
        except BaseException:
            # Whatever went wrong (cancellation included), the connection may hold
            # half a reply: never reuse it.
            await conn.disconnect(nowait=True)
            raise

    async def server_info(self, required: Sequence[str] = ()) -> ServerInfo:
        """Detect the server and its capabilities once (cached), refusing what cannot work.

        Args:
            required: Commands the caller will send; each is probed once.

        Raises:
            UnsupportedServerError: The server is older than Redis 6.2, or lacks one
                of ``required`` (the message names the server and the commands).
        """
        if self.server is None:
            self.server = await detect(self.execute)
        unchecked = [name for name in required if name not in self._checked]
        if unchecked:
            await require_commands(self.execute, self.server, unchecked)
            self._checked.update(unchecked)
        return self.server

    async def aclose(self) -> None:
        """Close streamq's connections (and the client, when streamq built it)."""
        self._closed = True
        if self._blocking is not None:
            await self._blocking.disconnect(nowait=True)
            self._blocking = None
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect(nowait=True)
        await self.pool.disconnect()
        if self._owned:
            await self._user_client.aclose()


async def send_retrying(
    what: str,
    commands: Sequence[Command],
    retry: NetworkRetry,
    send: Callable[[Sequence[Command]], Awaitable[list[Any]]],
    resend_refused: bool,
    recover: Callable[[list[int]], Awaitable[dict[int, Any]]] | None = None,
) -> list[Any]:
    """``send(commands)`` under ``retry``; per-command errors are returned, not raised.

    With ``resend_refused``, commands that Redis refused with a transient error
    (``CLUSTERDOWN``, ``TRYAGAIN``, ``READONLY``, ``MASTERDOWN``) are sent again,
    alone, under the same retry budget: a refused command did not run, so this
    duplicates nothing. When the budget runs out after some commands ran, their
    replies are returned and the unfinished ones hold the final error.

    ``recover`` (only with ``resend_refused``) runs before each resend with the
    indexes about to be sent again and returns the replies of those that need
    not be (e.g. found stored by an attempt whose reply was lost); the rest are
    sent.
    """
    if not resend_refused:
        return await retry.call(what, send, commands)
    results: list[Any] = [None] * len(commands)
    todo = list(range(len(commands)))
    attempted = False

    async def attempt() -> list[Any]:
        nonlocal todo, attempted
        if attempted and recover is not None:
            done = await recover(todo)
            for i, reply in done.items():
                results[i] = reply
            todo = [i for i in todo if i not in done]
            if not todo:
                return results
        attempted = True
        replies = await send(
            commands if len(todo) == len(commands) else [commands[i] for i in todo]
        )
        refused = []
        for i, reply in zip(todo, replies, strict=True):
            results[i] = reply
            if isinstance(reply, Exception) and is_network_error(reply):
                refused.append(i)
        todo = refused
        if refused:
            raise results[refused[0]]
        return results

    try:
        return await retry.call(what, attempt)
    except Exception as exc:
        if len(todo) == len(commands):
            raise
        for i in todo:
            results[i] = exc
        return results


def open_transport(redis: aioredis.Redis | RedisCluster | str, command_timeout: float) -> Transport:
    """Build the transport for a client or URL (see :data:`~streamq.RedisLike`).

    A ``RedisCluster`` (or a ``redis+cluster://``/``rediss+cluster://`` URL) gets a
    :class:`~streamq._cluster.ClusterTransport`.
    """
    from ._cluster import ClusterTransport, cluster_url

    if isinstance(redis, str):
        url = cluster_url(redis)
        if url is not None:
            return ClusterTransport(
                RedisCluster.from_url(url), owned=True, command_timeout=command_timeout
            )
        return Transport(
            aioredis.Redis.from_url(redis), owned=True, command_timeout=command_timeout
        )
    if isinstance(redis, RedisCluster):
        return ClusterTransport(redis, owned=False, command_timeout=command_timeout)
    return Transport(redis, owned=False, command_timeout=command_timeout)
