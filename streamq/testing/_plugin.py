"""The pytest plugin registered by installing streamq (entry point ``pytest11``).

Fixture names all start with ``streamq_`` so they never clash with a suite's own.
Nothing is started unless a test asks for one of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio

from .._servers import LocalRedis, ServerNotFoundError, ServerStartError


@pytest.fixture(scope="session")
def streamq_server() -> Iterator[LocalRedis]:
    """A throwaway Redis server for the test session, stopped (and its files deleted) at the end.

    The binary is ``redis-server`` from PATH, else the ``streamq[embedded]`` one;
    ``STREAMQ_REDIS_SERVER`` or ``STREAMQ_ENGINE`` choose another.
    """
    try:
        server = LocalRedis()
    except ServerNotFoundError as exc:
        pytest.fail(f"streamq_server: {exc}", pytrace=False)
    try:
        server.start()
    except ServerStartError as exc:
        server.close()
        pytest.fail(f"streamq_server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def streamq_url(streamq_server: LocalRedis) -> str:
    """The URL of :func:`streamq_server` (``redis://127.0.0.1:PORT/0``)."""
    return streamq_server.url


@pytest.fixture
async def streamq_redis(streamq_server: LocalRedis) -> AsyncIterator[redis.asyncio.Redis]:
    """A ``redis.asyncio.Redis`` connected to :func:`streamq_server`.

    Every database of the server is flushed after the test, so each test starts
    empty. Async fixture: mark the test ``@pytest.mark.anyio`` (or use
    pytest-asyncio in auto mode).
    """
    client = streamq_server.client()
    try:
        yield client
    finally:
        try:
            await client.flushall()
        finally:
            await client.aclose()
