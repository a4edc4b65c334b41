"""The pytest plugin that installing streamq registers, used as a user's test suite uses it.

pytester runs a small suite in a subprocess, so the plugin is loaded the way a
user gets it: through the ``pytest11`` entry point of the installed package.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio

from streamq import AsyncConsumer, Message
from streamq.testing import consume_until, wait_until

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.anyio

USER_SUITE = """
import os
from pathlib import Path

import pytest
from streamq import AsyncConsumer, AsyncPublisher, Message, fail
from streamq.testing import consume_until

pytestmark = pytest.mark.anyio


async def test_publish_and_consume(streamq_redis):
    async with AsyncPublisher(redis=streamq_redis) as publisher:
        await publisher.publish_many([Message("orders", {"n": i}) for i in range(5)])
    seen = []

    async def bill(msg):
        seen.append(int(msg.values["n"]))
        if int(msg.values["n"]) == 2 and msg.deliveries == 1:
            return fail("card declined", backoff=0.01)

    consumer = AsyncConsumer(redis=streamq_redis, group="billing", consumer="t", start_id="0")
    consumer.subscribe("orders", bill)
    stats = await consume_until(consumer, lambda s: s.succeeded == 5)
    assert stats.retried == 1
    assert sorted(seen) == [0, 1, 2, 2, 3, 4]
    assert (await streamq_redis.xpending("orders", "billing"))["pending"] == 0
    Path(os.environ["PID_FILE"]).write_text(str(streamq_redis.connection_pool.connection_kwargs["port"]))


async def test_each_test_starts_empty(streamq_redis):
    assert await streamq_redis.dbsize() == 0


async def test_condition_not_met_times_out_with_stats(streamq_redis):
    consumer = AsyncConsumer(redis=streamq_redis, group="g", consumer="t")
    async def noop(msg):
        return None
    consumer.subscribe("nothing", noop)
    with pytest.raises(TimeoutError, match="consumer statistics"):
        await consume_until(consumer, lambda s: s.handled > 0, timeout=0.3)


def test_sync_fixtures(streamq_url, streamq_server):
    assert streamq_url == streamq_server.url
    assert streamq_server.running
    Path(os.environ["PID_FILE"] + ".server").write_text(str(streamq_server.pid))
"""


def test_a_users_suite_gets_a_throwaway_redis(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "pid"
    monkeypatch.setenv("PID_FILE", str(pid_file))
    monkeypatch.delenv("REDIS_URL", raising=False)
    pytester.makepyfile(test_user=USER_SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error", "-q")
    result.assert_outcomes(passed=4)
    port = int(pid_file.read_text())
    assert port != 6379
    server_pid = int(Path(str(pid_file) + ".server").read_text())
    if Path("/proc/self").exists():
        # The session server is stopped when the user's session ends.
        assert not Path(f"/proc/{server_pid}").exists()


def test_the_fixtures_are_listed_for_users(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*streamq_server*", "*streamq_url*", "*streamq_redis*"])


async def test_consume_until_reraises_the_consumers_fatal_error(
    redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    await redis_client.set(stream_name, "not a stream")
    consumer = AsyncConsumer(redis=redis_client, group="g", consumer="c", network_retry=0)

    async def handle(msg: Message) -> None:
        return None

    consumer.subscribe(stream_name, handle)
    with pytest.raises(Exception, match="WRONGTYPE"):
        await consume_until(consumer, lambda s: s.handled > 0, timeout=5)


async def test_wait_until_accepts_async_conditions(redis_client: redis.asyncio.Redis) -> None:
    await redis_client.set("k", "1")

    async def present() -> bool:
        return bool(await redis_client.exists("k"))

    await wait_until(present, timeout=1)
    with pytest.raises(TimeoutError, match="never"):
        await wait_until(lambda: False, timeout=0.05, message="never")
