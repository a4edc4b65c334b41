"""streamq's connections to a Redis Cluster: commands routed by key slot.

A :class:`ClusterTransport` has the interface of the standalone
:class:`~streamq._transport.Transport` and is built from the user's
``redis.asyncio.cluster.RedisCluster``, from which it takes the seed nodes, the
connection settings (password, TLS, ...) and ``address_remap``. It does not send
through that client: redis-py's cluster client retries and reinitialises on its
own (three attempts by default) and decodes replies, and streamq wants one retry
layer and raw replies, exactly as on a single server. So:

* **Routing.** streamq keeps its own slot map, read with ``CLUSTER SLOTS``, and one
  standalone ``Transport`` (a connection pool with redis-py's retries disabled) per
  master. A command goes to the master of its key's slot. A command with several
  keys (``XREADGROUP ... STREAMS a b``) must have them all in one slot; it is
  refused locally with ``CROSSSLOT`` otherwise. Keyless commands (``INFO``) go to
  any master.
* **Who handles what.** ``MOVED`` and ``ASK`` are routing, not failures: this
  module follows them at once (``ASKING`` on the target for ``ASK``; for ``MOVED``
  it patches the slot and marks the map stale, so the next command rereads
  ``CLUSTER SLOTS``), up to 5 redirects per command. Everything transient
  (connection refused or reset, timeouts, ``CLUSTERDOWN``, ``TRYAGAIN``, a master
  being failed over) is raised to streamq's single retry layer (tenacity, in
  ``_retry.py``) after marking the map stale, so the retry, after its backoff,
  rereads the slot map and finds the promoted replica. redis-py's cluster client
  plays no part in either.
* **Pipelines** (acks, renewals, coalesced publishes) are split by master and sent
  concurrently, one round trip per master. :meth:`pipeline_retrying` retries each
  master's part on its own, so a publish batch never re-sends entries that a
  healthy master already stored because another master was failing over.
* **Blocking reads** get a dedicated connection per slot (each reader of a
  consumer reads one slot), with the same deadline rule as on a single server.
  Connections are opened lazily: a consumer holds, per master, its pooled
  connections plus one per slot it reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import ConnectionPool
from redis.crc import key_slot

from ._errors import is_network_error
from ._transport import Command, ServerInfo, Transport, send_retrying

if TYPE_CHECKING:
    from ._retry import NetworkRetry

__all__ = ["ClusterTransport", "cluster_url", "command_keys"]

SLOTS = 16384
_REDIRECTS = 5

# Connection settings that belong to redis-py's cluster client, not to a connection.
_CLUSTER_OWNED = (
    "connection_class",
    "max_connections",
    "response_callbacks",
    "redis_connect_func",
    "host",
    "port",
)

# Commands whose key is the third word (after a subcommand).
_KEY_AT_2 = frozenset({"XGROUP", "XINFO", "OBJECT", "MEMORY"})
# Commands that have no key and can run on any master.
_KEYLESS = frozenset(
    {
        "INFO", "PING", "COMMAND", "TIME", "CLUSTER", "CLIENT", "CONFIG", "ECHO",
        "HELLO", "SCRIPT", "FUNCTION", "ROLE", "LASTSAVE", "DBSIZE", "WAIT",
    }
)  # fmt: skip


def command_keys(args: Sequence[Any]) -> Sequence[Any]:
    """The keys of a command, as far as streamq's commands go.

    ``XREADGROUP``/``XREAD``: the keys after ``STREAMS``; ``EVAL``/``EVALSHA``/
    ``FCALL``: the declared keys; ``XGROUP``/``XINFO``: the word after the
    subcommand; a handful of server commands: none; anything else: the second word.
    """
    name = args[0].upper() if isinstance(args[0], str) else args[0].decode().upper()
    if name in _KEYLESS:
        return ()
    if name in ("XREADGROUP", "XREAD"):
        for i in range(1, len(args)):
            word = args[i]
            if isinstance(word, bytes):
                word = word.decode()
            if isinstance(word, str) and word.upper() == "STREAMS":
                rest = args[i + 1 :]
                return rest[: len(rest) // 2]
        return ()
    if name in ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"):
        return args[3 : 3 + int(args[2])]
    if name in _KEY_AT_2:
        return args[2:3]
    return args[1:2]


def _encode(key: Any) -> bytes:
    if isinstance(key, bytes):
        return key
    return str(key).encode()


class ClusterTransport(Transport):
    """Commands to a Redis Cluster, on connections streamq owns (see the module docs).

    Args:
        client: The user's cluster client; its seeds and connection settings are copied.
        owned: Whether ``client`` was built by streamq (then it is closed too).
        command_timeout: Seconds to wait for the answer to a non-blocking command.
    """

    # Transport.__init__ is not called: this class shares the interface, and each
    # master gets a standalone Transport of its own.
    def __init__(self, client: RedisCluster, *, owned: bool, command_timeout: float) -> None:
        self._user_cluster = client
        self._owned = owned
        self.command_timeout = command_timeout
        kwargs = dict(client.connection_kwargs)
        self._connection_class = kwargs.get("connection_class") or aioredis.Connection
        for key in _CLUSTER_OWNED:
            kwargs.pop(key, None)
        self._connection_kwargs = kwargs
        manager = client.nodes_manager
        self._remap: Callable[[tuple[str, int]], tuple[str, int]] | None = getattr(
            manager, "address_remap", None
        )
        seeds: dict[str, tuple[str, int]] = {}
        for node in (*manager.startup_nodes.values(), *manager.nodes_cache.values()):
            seeds.setdefault(f"{node.host}:{node.port}", (node.host, int(node.port)))
        self._seeds = list(seeds.values())
        self._nodes: dict[tuple[str, int], Transport] = {}
        self._slots: list[tuple[str, int] | None] = [None] * SLOTS
        self._masters: list[tuple[str, int]] = []
        self._stale = True
        # Nodes that failed lately: asked for the slot map last, so that a dead
        # (or black-holed) master does not delay every refresh of a failover.
        self._suspects: set[tuple[str, int]] = set()
        self._refresh_lock = asyncio.Lock()
        self._slot_cache: dict[Any, int] = {}
        # Per slot: the master it was read from, and the Transport holding the
        # dedicated connection of that slot's blocking reads.
        self._readers: dict[int, tuple[tuple[str, int], Transport]] = {}
        self._server: ServerInfo | None = None
        self._closed = False

    # -- topology ---------------------------------------------------------------

    @property
    def server(self) -> ServerInfo | None:
        """What the masters said about themselves (the oldest), once detected."""
        return self._server

    @server.setter
    def server(self, value: ServerInfo | None) -> None:
        self._server = value

    def _make_transport(self, address: tuple[str, int]) -> Transport:
        host, port = address
        pool = ConnectionPool(
            connection_class=self._connection_class,
            host=host,
            port=port,
            **self._connection_kwargs,
        )
        # Transport copies these settings into connections of its own (retries
        # off, RESP2, raw replies); this client never connects by itself.
        return Transport(
            aioredis.Redis(connection_pool=pool), owned=True, command_timeout=self.command_timeout
        )

    def _node(self, address: tuple[str, int]) -> Transport:
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = self._make_transport(address)
        return node

    def _address(self, host: str, port: int) -> tuple[str, int]:
        if self._remap is not None:
            host, port = self._remap((host, port))
        return host, int(port)

    def slot(self, key: Any) -> int:
        """The cluster slot of ``key`` (hash tags honoured)."""
        slot = self._slot_cache.get(key)
        if slot is None:
            if len(self._slot_cache) > 100_000:
                self._slot_cache.clear()
            slot = self._slot_cache[key] = key_slot(_encode(key))
        return slot

    async def _refresh(self) -> None:
        """Reread the slot map with CLUSTER SLOTS from any node that answers."""
        async with self._refresh_lock:
            if not self._stale:
                return
            known = dict.fromkeys((*self._masters, *self._nodes, *self._seeds))
            candidates = sorted(known, key=lambda address: address in self._suspects)
            error: BaseException | None = None
            for address in candidates:
                node = self._node(address)
                try:
                    reply = await node.execute("CLUSTER", "SLOTS")
                except Exception as exc:
                    if not is_network_error(exc):
                        raise
                    self._suspects.add(address)
                    error = exc
                    continue
                self._suspects.discard(address)
                if self._apply_slots(reply, address):
                    self._stale = False
                    return
            if error is not None:
                raise error
            raise rex.ClusterDownError("no cluster node answered CLUSTER SLOTS with a full map")

    def _apply_slots(self, reply: Any, asked: tuple[str, int]) -> bool:
        slots: list[tuple[str, int] | None] = [None] * SLOTS
        masters: dict[tuple[str, int], None] = {}
        for entry in reply or ():
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            raw_host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            # An empty or "?" host means "the address you reached me on".
            host = raw_host if raw_host not in ("", "?") else asked[0]
            address = self._address(host, int(master[1]))
            masters[address] = None
            slots[start : end + 1] = [address] * (end - start + 1)
        if not masters:
            return False
        self._slots = slots
        self._masters = list(masters)
        return True

    def _moved(self, exc: rex.AskError, via: tuple[str, int]) -> tuple[str, int]:
        host = exc.host or via[0]
        return self._address(host, int(exc.port))

    async def _master_of(self, slot: int) -> tuple[str, int]:
        """The address of the master serving ``slot``, refreshing a stale map first."""
        if self._stale:
            await self._refresh()
        address = self._slots[slot]
        if address is None:
            self._stale = True
            raise rex.ClusterDownError(f"slot {slot} is not served by any master")
        return address

    async def _node_for_slot(self, slot: int) -> Transport:
        return self._node(await self._master_of(slot))

    async def _any_master(self) -> Transport:
        if self._stale:
            await self._refresh()
        return self._node(self._masters[0])

    def _slot_of(self, args: Command) -> int | None:
        keys = command_keys(args)
        if not keys:
            return None
        slot = self.slot(keys[0])
        for key in keys[1:]:
            if self.slot(key) != slot:
                raise rex.ClusterCrossSlotError(
                    f"CROSSSLOT {args[0]}: keys {list(keys)!r} hash to different slots"
                )
        return slot

    def slot_groups(self, streams: Iterable[str]) -> list[list[str]]:
        """Split ``streams`` into groups of one slot each (first-seen order kept)."""
        groups: dict[int, list[str]] = {}
        for stream in streams:
            groups.setdefault(self.slot(stream), []).append(stream)
        return list(groups.values())

    def masters_of(self, keys: Iterable[str]) -> dict[str, tuple[str, int]]:
        """The master ``(host, port)`` currently serving each key (from the slot map)."""
        return {key: addr for key in keys if (addr := self._slots[self.slot(key)]) is not None}

    def master_of(self, key: Any) -> tuple[str, int] | None:
        """The master ``(host, port)`` serving ``key``; None until the slot map is read."""
        return self._slots[self.slot(key)]

    # -- commands ---------------------------------------------------------------

    def _failed(self, exc: BaseException, address: tuple[str, int] | None = None) -> None:
        if is_network_error(exc):
            # The topology may have changed (failover): reread it before the retry.
            self._stale = True
            if address is not None:
                self._suspects.add(address)

    async def execute(self, *args: Any) -> Any:
        """Send one command to the master of its key's slot and return the raw reply."""
        slot = self._slot_of(args)
        node = await (self._any_master() if slot is None else self._node_for_slot(slot))
        for _ in range(_REDIRECTS):
            try:
                return await node.execute(*args)
            except rex.AskError as exc:  # MovedError included
                target = self._moved(exc, self._address_of(node))
                if isinstance(exc, rex.MovedError):
                    assert slot is not None
                    self._slots[slot] = target
                    self._stale = True
                    node = self._node(target)
                    continue
                replies = await self._node(target).pipeline([("ASKING",), args])
                if isinstance(replies[1], BaseException):
                    raise replies[1] from None
                return replies[1]
            except Exception as exc:
                self._failed(exc, self._address_of(node))
                raise
        self._stale = True
        raise rex.TryAgainError(f"{args[0]}: redirected {_REDIRECTS} times; the cluster is moving")

    def _address_of(self, node: Transport) -> tuple[str, int]:
        for address, candidate in self._nodes.items():
            if candidate is node:
                return address
        return ("", 0)

    async def pipeline(self, commands: Sequence[Command]) -> list[Any]:
        """Send commands in one round trip per master; per-command errors are returned.

        A connection failure of any master raises (after every master answered or
        failed), like the standalone pipeline.
        """
        results: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        asking: dict[int, tuple[str, int]] = {}
        for _ in range(_REDIRECTS):
            if self._stale:
                await self._refresh()
            groups: dict[tuple[str, int], list[int]] = {}
            for i in todo:
                address = asking.get(i)
                if address is None:
                    slot = self._slot_of(commands[i])
                    address = self._masters[0] if slot is None else self._slots[slot]
                    if address is None:
                        self._stale = True
                        raise rex.ClusterDownError(f"slot {slot} is not served by any master")
                groups.setdefault(address, []).append(i)
            outcomes = await asyncio.gather(
                *(self._send_group(addr, idxs, commands, asking) for addr, idxs in groups.items()),
                return_exceptions=True,
            )
            failure: BaseException | None = None
            todo = []
            for (address, idxs), outcome in zip(groups.items(), outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, Exception):
                        raise outcome
                    self._failed(outcome, address)
                    failure = failure or outcome
                    continue
                for i, reply in zip(idxs, outcome, strict=True):
                    asking.pop(i, None)
                    if isinstance(reply, rex.AskError):
                        target = self._moved(reply, address)
                        if isinstance(reply, rex.MovedError):
                            self._slots[int(reply.slot_id)] = target
                            self._stale = True
                        else:
                            asking[i] = target
                        todo.append(i)
                    else:
                        results[i] = reply
            if failure is not None:
                raise failure
            if not todo:
                return results
        self._stale = True
        raise rex.TryAgainError(f"pipeline: redirected {_REDIRECTS} times; the cluster is moving")

    async def _send_group(
        self,
        address: tuple[str, int],
        idxs: list[int],
        commands: Sequence[Command],
        asking: dict[int, tuple[str, int]],
    ) -> list[Any]:
        node = self._node(address)
        if not any(i in asking for i in idxs):
            return await node.pipeline([commands[i] for i in idxs])
        batch: list[Command] = []
        keep: list[int] = []
        for i in idxs:
            if i in asking:
                batch.append(("ASKING",))
            keep.append(len(batch))
            batch.append(commands[i])
        replies = await node.pipeline(batch)
        return [replies[k] for k in keep]

    async def pipeline_retrying(
        self,
        what: str,
        commands: Sequence[Command],
        retry: NetworkRetry,
        *,
        resend_refused: bool = False,
    ) -> list[Any]:
        """Like :meth:`pipeline`, each master's part retried on its own by ``retry``.

        A master that is failing over delays only its own commands' retries; what a
        healthy master already executed is never sent twice. ``resend_refused``: as
        for :meth:`Transport.pipeline_retrying`; a master that stayed unreachable
        then fails only its own commands (they hold the error).
        """
        if not commands:
            return []
        if self._stale:
            await retry.call(what, self._refresh)
        groups: dict[tuple[str, int] | None, list[int]] = {}
        for i, cmd in enumerate(commands):
            slot = self._slot_of(cmd)
            groups.setdefault(None if slot is None else self._slots[slot], []).append(i)
        if len(groups) == 1:
            return await send_retrying(what, commands, retry, self.pipeline, resend_refused)
        parts = list(groups.values())
        outcomes = await asyncio.gather(
            *(
                send_retrying(
                    what, [commands[i] for i in idxs], retry, self.pipeline, resend_refused
                )
                for idxs in parts
            ),
            return_exceptions=True,
        )
        results: list[Any] = [None] * len(commands)
        failure: BaseException | None = None
        ran = False
        for idxs, outcome in zip(parts, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                failure = failure or outcome
                for i in idxs:
                    results[i] = outcome
                continue
            ran = True
            for i, reply in zip(idxs, outcome, strict=True):
                results[i] = reply
        if failure is not None and not (resend_refused and ran):
            raise failure
        return results

    async def blocking(self, args: Command, block: float) -> Any:
        """Run a blocking command on a dedicated connection to the master of its slot.

        Same contract as :meth:`Transport.blocking`. Each slot has its own
        connection (a standalone ``Transport`` of its own, which holds only that
        one), moved to the new master when the slot moves.
        """
        slot = self._slot_of(args)
        if slot is None:
            raise ValueError(f"{args[0]}: a blocking command needs a key")
        for _ in range(_REDIRECTS):
            address = await self._master_of(slot)
            reader = self._readers.get(slot)
            if reader is not None and reader[0] != address:
                await reader[1].aclose()
                reader = None
            if reader is None:
                reader = self._readers[slot] = (address, self._make_transport(address))
            try:
                return await reader[1].blocking(args, block)
            except rex.AskError as exc:
                if isinstance(exc, rex.MovedError):
                    self._slots[slot] = self._moved(exc, address)
                    self._stale = True
                    continue
                # The slot is being migrated; reading must wait until it is done.
                raise rex.TryAgainError(f"{args[0]}: slot {slot} is migrating") from exc
            except Exception as exc:
                self._failed(exc, address)
                raise
        self._stale = True
        raise rex.TryAgainError(f"{args[0]}: redirected {_REDIRECTS} times; the cluster is moving")

    async def server_info(self, *args: Any, **kwargs: Any) -> ServerInfo:
        """Detect every master (cached) and return the oldest; refuse what cannot work.

        Takes the same arguments as :meth:`Transport.server_info`, applied to each
        master: a cluster in the middle of a rolling upgrade is judged by its
        oldest member.
        """
        if self._stale:
            await self._refresh()
        infos = [await self._node(a).server_info(*args, **kwargs) for a in self._masters]
        oldest = min(infos, key=lambda info: getattr(info, "compat_version", ()) or info.version)
        self._server = oldest
        return oldest

    async def aclose(self) -> None:
        """Close streamq's connections (and the client, when streamq built it)."""
        if self._closed:
            return
        self._closed = True
        readers, self._readers = self._readers, {}
        for _, reader in readers.values():
            await reader.aclose()
        for node in self._nodes.values():
            await node.aclose()
        if self._owned:
            await self._user_cluster.aclose()


def cluster_url(url: str) -> str | None:
    """``redis://...`` for a ``redis+cluster://...`` URL (``rediss`` likewise), else None."""
    for scheme, plain in (("redis+cluster://", "redis://"), ("rediss+cluster://", "rediss://")):
        if url.startswith(scheme):
            return plain + url[len(scheme) :]
    return None
