"""A throwaway Redis Cluster: :class:`LocalCluster`, a set of :class:`LocalRedis` nodes.

The nodes are joined with raw cluster commands rather than ``redis-cli``, so any
engine works; helpers read the slot map, kill a master and wait for the failover
and for every node to agree on a consistent cluster again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import redis.asyncio.cluster

from ._binaries import ServerBinary, find_server_binary
from ._errors import RespError, ServerStartError, UnsupportedFeatureError
from ._local import LocalRedis
from ._process import RespReply, _info_fields

__all__ = ["LocalCluster"]

_CLUSTER_SLOTS = 16384


@dataclasses.dataclass(frozen=True)
class _SlotRange:
    start: int
    end: int
    master_port: int
    replica_ports: tuple[int, ...]


class LocalCluster:
    """A throwaway Redis Cluster of local :class:`LocalRedis` nodes.

    The cluster is joined with raw commands (CLUSTER SET-CONFIG-EPOCH, ADDSLOTS,
    MEET, REPLICATE) rather than ``redis-cli --cluster create``, so it works with
    any engine, including wheels that ship no CLI.

    Example:
        >>> with LocalCluster(masters=3, replicas=1) as cluster:  # doctest: +SKIP
        ...     client = cluster.client()
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        *,
        binary: ServerBinary | None = None,
        engine: str | None = None,
        password: str | None = None,
        node_timeout_ms: int = 2000,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        """Prepare (but do not start) a cluster.

        Args:
            masters: Number of masters; slots are split evenly between them.
            replicas: Replicas per master.
            binary: The server binary; default :func:`find_server_binary` ``(engine)``.
            engine: Engine name used when ``binary`` is not given.
            password: Password of every node (also used between replicas and masters).
            node_timeout_ms: ``cluster-node-timeout``; it bounds how fast failures
                are detected.
            extra_args: Extra command-line arguments for every node.
            startup_timeout: Seconds to wait for the cluster to become consistent.
        """
        if masters < 1 or replicas < 0:
            raise ValueError("need at least one master and a non-negative replica count")
        self.binary: ServerBinary = binary if binary is not None else find_server_binary(engine)
        if not self.binary.supports_cluster:
            raise UnsupportedFeatureError(f"{self.binary.path} does not support cluster mode")
        self.master_count = masters
        self.replicas_per_master = replicas
        self.password = password
        self.startup_timeout = startup_timeout
        self.nodes: list[LocalRedis] = [
            LocalRedis(
                binary=self.binary,
                password=password,
                cluster=True,
                cluster_node_timeout_ms=node_timeout_ms,
                extra_args=extra_args,
            )
            for _ in range(masters * (1 + replicas))
        ]

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        """Start every node, join them into a cluster and wait until it is consistent.

        Returns:
            ``self``.

        Raises:
            ServerStartError: A node did not start or the cluster did not converge.
        """
        try:
            for node in self.nodes:
                node.start()
            self._join()
            self.wait_until_ready(self.startup_timeout)
        except BaseException:
            self.close()
            raise
        return self

    def stop(self) -> None:
        """Stop every node gracefully (data directories are kept)."""
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        """Stop every node and delete their data directories. Idempotent."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        # Blocking, like LocalRedis.__aenter__, so the nodes get the parent-death signal.
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        ports = ",".join(str(n._port) for n in self.nodes)
        return f"<LocalCluster {self.binary.engine} ports={ports}>"

    # -- addressing and clients ---------------------------------------------------------

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node, for cluster clients."""
        return [node.address for node in self.nodes]

    @property
    def url(self) -> str:
        """A ``redis://`` URL of one running node (cluster clients discover the rest)."""
        for node in self.nodes:
            if node.running:
                return node.url
        return self.nodes[0].url

    def client(self, **kwargs: Any) -> redis.asyncio.cluster.RedisCluster:
        """Create a ``redis.asyncio.cluster.RedisCluster`` for this cluster.

        Args:
            **kwargs: Passed to ``RedisCluster``, overriding the defaults.

        Returns:
            A new client; the caller must ``await client.aclose()``.
        """
        options: dict[str, Any] = {
            "startup_nodes": [
                redis.asyncio.cluster.ClusterNode(host, port) for host, port in self.startup_nodes
            ]
        }
        if self.password is not None:
            options["password"] = self.password
        options.update(kwargs)
        return redis.asyncio.cluster.RedisCluster(**options)

    # -- topology -----------------------------------------------------------------------

    def masters(self) -> list[LocalRedis]:
        """Running nodes that currently serve slots, ordered by their lowest slot.

        The order is stable across a failover: a promoted replica takes the place of
        the master it replaced.
        """
        by_port = {node.port: node for node in self.nodes if node.running}
        ranges = self._slot_ranges()
        first_slot: dict[int, int] = {}
        for slot_range in ranges:
            if slot_range.master_port in by_port:
                port = slot_range.master_port
                first_slot[port] = min(first_slot.get(port, _CLUSTER_SLOTS), slot_range.start)
        return [by_port[port] for port in sorted(first_slot, key=first_slot.__getitem__)]

    def replicas(self) -> list[LocalRedis]:
        """Running nodes that are replicas."""
        result = []
        for node in self.nodes:
            if node.running:
                with contextlib.suppress(OSError, ConnectionError, RespError):
                    role = node.execute("ROLE")
                    if isinstance(role, list) and role and role[0] in ("slave", "replica"):
                        result.append(node)
        return result

    def slot_ranges(self) -> list[tuple[int, int, int]]:
        """``(first_slot, last_slot, master_port)`` as seen by a running node."""
        return [(r.start, r.end, r.master_port) for r in self._slot_ranges()]

    def kill_master(self, index: int = 0) -> LocalRedis:
        """SIGKILL the ``index``-th master (see :meth:`masters`) to trigger a failover.

        Returns:
            The killed node; ``restart()`` it to have it rejoin as a replica.
        """
        if self.replicas_per_master == 0:
            raise RuntimeError("a cluster without replicas cannot fail over; use replicas>=1")
        node = self.masters()[index]
        node.kill()
        return node

    def wait_for_failover(self, timeout: float = 30.0) -> None:
        """Wait until every slot is served by a running master and the cluster is ok.

        Call after :meth:`kill_master`: it returns once a replica has been promoted
        and every running node agrees on the new slot map.

        Raises:
            TimeoutError: The cluster did not recover within ``timeout`` seconds.
        """
        self.wait_until_ready(timeout)

    def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Wait until all running nodes report ``cluster_state:ok`` and agree on the slots.

        Also requires that every slot is owned by a running master and that every
        running replica has a live link to its master.

        Raises:
            TimeoutError: The cluster did not converge within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            problem = self._readiness_problem()
            if problem is None:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ready after {timeout:.0f}s: {problem}")
            time.sleep(0.05)

    # -- internals ----------------------------------------------------------------------

    def _slot_ranges(self, node: LocalRedis | None = None) -> list[_SlotRange]:
        candidates = [node] if node is not None else [n for n in self.nodes if n.running]
        for candidate in candidates:
            try:
                reply = candidate.execute("CLUSTER", "SLOTS")
            except (OSError, ConnectionError, RespError):
                continue
            return _parse_cluster_slots(reply)
        return []

    def _readiness_problem(self) -> str | None:
        live = [node for node in self.nodes if node.running]
        if not live:
            return "no node is running"
        live_ports = {node.port for node in live}
        views: list[list[_SlotRange]] = []
        for node in live:
            try:
                info = _info_fields(node.execute("CLUSTER", "INFO"))
                if info.get("cluster_state") != "ok":
                    return f"node {node.port} reports cluster_state:{info.get('cluster_state')}"
                views.append(sorted(self._slot_ranges(node), key=lambda r: r.start))
                role = node.execute("ROLE")
                if isinstance(role, list) and role and role[0] in ("slave", "replica"):
                    link = node.info("replication").get("master_link_status")
                    if link != "up":
                        return f"replica {node.port} has master_link_status:{link}"
            except (OSError, ConnectionError, RespError) as exc:
                return f"node {node.port}: {exc}"
        if any(view != views[0] for view in views[1:]):
            return "nodes disagree on the slot map"
        covered = sum(r.end - r.start + 1 for r in views[0] if r.master_port in live_ports)
        if covered != _CLUSTER_SLOTS:
            return f"only {covered} of {_CLUSTER_SLOTS} slots are served by running masters"
        return None

    def _join(self) -> None:
        masters = self.nodes[: self.master_count]
        # Distinct config epochs up front spare the cluster its epoch-collision dance.
        for epoch, node in enumerate(self.nodes, start=1):
            node.execute("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for index, node in enumerate(masters):
            first = index * _CLUSTER_SLOTS // self.master_count
            last = (index + 1) * _CLUSTER_SLOTS // self.master_count - 1
            # ADDSLOTSRANGE is Redis 7+; ADDSLOTS with every slot works everywhere.
            node.execute("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            meet: list[str | int] = ["CLUSTER", "MEET", node.host, node.port]
            if self.binary.supports_cluster_port:
                bus = node.cluster_bus_port
                assert bus is not None
                meet.append(bus)
            seed.execute(*meet)
        self._wait_all_known()
        ids = [str(node.execute("CLUSTER", "MYID")) for node in masters]
        for index, node in enumerate(self.nodes[self.master_count :]):
            master_id = ids[index % self.master_count]
            node.execute("CLUSTER", "REPLICATE", master_id)

    def _wait_all_known(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        total = len(self.nodes)
        while True:
            done = True
            for node in self.nodes:
                text = node.execute("CLUSTER", "NODES")
                lines = [line for line in str(text).splitlines() if line.strip()]
                if len(lines) != total or any(
                    "handshake" in line or "noaddr" in line for line in lines
                ):
                    done = False
                    break
            if done:
                return
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"cluster nodes did not all meet within {self.startup_timeout:.0f}s"
                )
            time.sleep(0.02)


def _parse_cluster_slots(reply: RespReply) -> list[_SlotRange]:
    ranges: list[_SlotRange] = []
    if not isinstance(reply, list):
        return ranges
    for entry in reply:
        if not isinstance(entry, list) or len(entry) < 3:
            continue
        start, end, master, *replicas = entry
        if not (isinstance(start, int) and isinstance(end, int) and isinstance(master, list)):
            continue
        master_port = master[1]
        replica_ports = tuple(
            sorted(r[1] for r in replicas if isinstance(r, list) and isinstance(r[1], int))
        )
        if isinstance(master_port, int):
            ranges.append(_SlotRange(start, end, master_port, replica_ports))
    return ranges
