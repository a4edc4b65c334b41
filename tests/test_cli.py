"""The ``streamq`` command, run as users run it: the console script in a subprocess.

Each test sets a stream up through the library (real consumers failing and
dead-lettering), runs the command against the suite's server, and checks its
output, its exit code and what Redis holds afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from streamq import AsyncConsumer, AsyncPublisher, Backoff, Message
from streamq._admin import replay
from streamq._cli import EXIT_CODES, build_parser, main
from streamq._servers import LocalRedis
from streamq._transport import open_transport
from streamq.testing import consume_until, wait_until

pytestmark = pytest.mark.anyio

STREAMQ = str(Path(sys.executable).with_name("streamq"))
COMMANDS = ("demo", "info", "pending", "dead", "replay", "trim", "bench")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("REDIS_URL", None)  # never fall back to a developer's Redis
    return env


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed console script."""
    return subprocess.run(
        [STREAMQ, *args], capture_output=True, text=True, timeout=timeout, env=_env()
    )


def _redis_keys(url: str, pattern: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return list(client.keys(pattern))
    finally:
        client.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _failing_stream(client: redis.asyncio.Redis, stream: str) -> None:
    """10 messages; n=3 and n=7 always fail and end in the dead-letter stream.

    Group ``billing`` processes everything; group ``audit`` has read three
    entries without acknowledging them and not read the other seven.
    """
    async with AsyncPublisher(redis=client) as pub:
        await pub.publish_many([Message(stream, {"n": i}) for i in range(10)])

    async def handle(msg: Message) -> None:
        if int(msg.values["n"]) in (3, 7):
            raise ValueError(f"cannot bill order {int(msg.values['n'])}")

    consumer = AsyncConsumer(
        redis=client,
        group="billing",
        consumer="worker-1",
        start_id="0",
        max_retry=1,
        backoff=Backoff(min=0.01, max=0.02),
    )
    consumer.subscribe(stream, handle)
    await consume_until(consumer, lambda s: s.dead_lettered == 2 and s.succeeded == 8)
    await client.xgroup_create(stream, "audit", id="0")
    await client.xreadgroup("audit", "auditor-1", {stream: ">"}, count=3)


def test_every_command_has_help_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (None, *COMMANDS):
        argv = ["--help"] if command is None else [command, "--help"]
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out, command
        assert "exit codes:" in out, command
        assert "streamq" in out


def test_console_script_and_module_run() -> None:
    result = cli("--help")
    assert result.returncode == 0
    assert "streamq demo" in result.stdout
    for code in EXIT_CODES:
        assert f"  {code} " in result.stdout
    module = subprocess.run(
        [sys.executable, "-m", "streamq", "--version"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert module.returncode == 0
    assert module.stdout.startswith("streamq ")


def test_usage_errors_exit_1() -> None:
    no_command = cli()
    assert no_command.returncode == 1
    missing = cli("info")
    assert missing.returncode == 1
    assert "required: stream" in missing.stderr
    bad_url = cli("info", "orders", "--url", "http://localhost:6379")
    assert bad_url.returncode == 1
    assert "is not a Redis URL" in bad_url.stderr
    assert build_parser().prog == "streamq"


def test_unreachable_server_exits_3_with_a_clear_message() -> None:
    port = _closed_port()
    result = cli("info", "orders", "--url", f"redis://127.0.0.1:{port}/0", "--timeout", "2")
    assert result.returncode == 3
    assert f"cannot connect to redis://127.0.0.1:{port}/0" in result.stderr
    assert "Traceback" not in result.stderr


def test_refused_credentials_exit_3_without_printing_the_password(make_server: Any) -> None:
    server = make_server(password="s3cret")
    result = cli("info", "orders", "--url", f"redis://:wrong@127.0.0.1:{server.port}/0")
    assert result.returncode == 3
    assert "refused the credentials" in result.stderr
    assert "wrong" not in result.stderr


async def test_missing_stream_or_group_exits_2(
    redis_url: str, redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    for args in (
        ("info", stream_name),
        ("pending", stream_name, "billing"),
        ("dead", stream_name),
        ("replay", stream_name),
        ("trim", stream_name, "--maxlen", "5"),
        ("prune", stream_name, "billing", "--idle", "60"),
    ):
        result = cli(*args, "--url", redis_url)
        assert result.returncode == 2, (args, result.stderr)
        assert f"stream {stream_name!r} does not exist" in result.stderr
    await redis_client.xadd(stream_name, {"a": "1"})
    for args in (
        ("pending", stream_name, "nosuchgroup"),
        ("prune", stream_name, "nosuchgroup", "--idle", "60"),
    ):
        result = cli(*args, "--url", redis_url)
        assert result.returncode == 2, (args, result.stderr)
        assert "consumer group 'nosuchgroup'" in result.stderr
    await redis_client.set(f"{stream_name}:str", "x")
    result = cli("info", f"{stream_name}:str", "--url", redis_url)
    assert result.returncode == 2
    assert "is a string, not a stream" in result.stderr


async def test_info_reports_groups_consumers_lag_and_dead_letters(
    redis_url: str, redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    await _failing_stream(redis_client, stream_name)
    result = cli("info", stream_name, "--url", redis_url, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["length"] == 10
    assert info["dead_letters"] == 2
    assert info["dead_letter_stream"] == f"{stream_name}:dead"
    entries = await redis_client.xrange(stream_name)
    assert info["first_id"] == entries[0][0].decode()
    assert info["last_id"] == entries[-1][0].decode()
    groups = {g["name"]: g for g in info["groups"]}
    assert groups["billing"]["pending"] == 0
    assert groups["billing"]["lag"] == 0
    assert groups["audit"]["pending"] == 3
    assert groups["audit"]["lag"] == 7
    assert groups["audit"]["oldest_pending_id"] == entries[0][0].decode()
    assert groups["audit"]["oldest_pending_deliveries"] == 1
    assert groups["audit"]["consumers"] == [
        {"name": "auditor-1", "pending": 3, "idle": groups["audit"]["consumers"][0]["idle"]}
    ]
    transport = open_transport(redis_url, 5.0)
    try:
        server = (await transport.server_info()).description  # "Valkey 8.1.8 (Redis 7.2.4 ..."
    finally:
        await transport.aclose()
    assert info["server"] == server
    text = cli("info", stream_name, "--url", redis_url)
    assert text.returncode == 0
    assert f"server        {server}\n" in text.stdout
    assert "group audit" in text.stdout
    assert "auditor-1" in text.stdout
    assert f"2 in {stream_name}:dead" in text.stdout


async def test_pending_lists_entries_per_consumer(
    redis_url: str, redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    await _failing_stream(redis_client, stream_name)
    result = cli("pending", stream_name, "audit", "--url", redis_url, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["total"] == 3
    assert report["per_consumer"] == {"auditor-1": 3}
    assert [e["deliveries"] for e in report["entries"]] == [1, 1, 1]
    text = cli("pending", stream_name, "audit", "--url", redis_url, "--count", "2")
    assert text.returncode == 0
    assert "3 pending" in text.stdout
    assert "(2 of 3 shown" in text.stdout
    none = cli("pending", stream_name, "billing", "--url", redis_url)
    assert none.returncode == 0
    assert "nothing pending" in none.stdout


async def test_dead_shows_errors_and_metadata(
    redis_url: str, redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    await _failing_stream(redis_client, stream_name)
    result = cli("dead", stream_name, "--url", redis_url, "--json")
    assert result.returncode == 0, result.stderr
    dead = json.loads(result.stdout)
    assert dead["length"] == 2
    # Handlers run concurrently: the two dead letters may arrive in either order.
    letters = sorted(dead["entries"], key=lambda d: d["fields"]["n"])
    assert [d["fields"] for d in letters] == [{"n": "3"}, {"n": "7"}]
    assert all(d["group"] == "billing" and d["consumer"] == "worker-1" for d in letters)
    assert all(d["deliveries"] == 2 for d in letters)
    assert letters[0]["error"] == "ValueError: cannot bill order 3"
    assert letters[0]["original_stream"] == stream_name
    text = cli("dead", stream_name, "--url", redis_url)
    assert text.returncode == 0
    assert "error: ValueError: cannot bill order 7" in text.stdout
    assert "n = 3" in text.stdout


async def test_replay_moves_dead_letters_back_without_metadata(
    redis_url: str, redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    await _failing_stream(redis_client, stream_name)
    dry = cli("replay", stream_name, "--url", redis_url, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would replay 2 dead letter(s)" in dry.stdout
    assert await redis_client.xlen(f"{stream_name}:dead") == 2
    assert await redis_client.xlen(stream_name) == 10

    result = cli("replay", stream_name, "--url", redis_url, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["replayed"] == 2
    assert await redis_client.xlen(f"{stream_name}:dead") == 0
    tail = await redis_client.xrange(stream_name, "-", "+")
    assert sorted(fields[b"n"] for _, fields in tail[-2:]) == [b"3", b"7"]
    assert all(set(fields) == {b"n"} for _, fields in tail[-2:])
    # The replayed entries are new to the group: billing sees them again.
    info = json.loads(cli("info", stream_name, "--url", redis_url, "--json").stdout)
    assert {g["name"]: g["lag"] for g in info["groups"]} == {"billing": 2, "audit": 9}


async def test_replay_by_id_and_not_found_id(
    redis_url: str, redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    await _failing_stream(redis_client, stream_name)
    first, second = (
        entry_id.decode() for entry_id, _ in await redis_client.xrange(f"{stream_name}:dead")
    )
    result = cli("replay", stream_name, "--url", redis_url, "--id", second)
    assert result.returncode == 0, result.stderr
    assert [e[0].decode() for e in await redis_client.xrange(f"{stream_name}:dead")] == [first]
    missing = cli("replay", stream_name, "--url", redis_url, "--id", second)
    assert missing.returncode == 2
    assert f"no entry {second}" in missing.stderr


async def test_replay_interrupted_between_append_and_delete_duplicates_never_loses(
    redis_server: LocalRedis, redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    await _failing_stream(redis_client, stream_name)
    transport = open_transport(redis_server.url, 5.0)
    real_execute = transport.execute

    async def execute(*args: Any) -> Any:
        if args[0] == "XDEL":
            raise ConnectionError("connection lost before XDEL")
        return await real_execute(*args)

    transport.execute = execute  # type: ignore[method-assign]
    try:
        with pytest.raises(Exception, match="connection lost before XDEL"):
            await replay(transport, stream_name)
    finally:
        await transport.aclose()
    # Both copies exist: the replay can be run again, at worst twice.
    assert await redis_client.xlen(f"{stream_name}:dead") == 2
    assert await redis_client.xlen(stream_name) == 12


async def test_trim_keeps_what_a_group_still_needs(
    redis_url: str, redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    await _failing_stream(redis_client, stream_name)
    dry = cli("trim", stream_name, "--maxlen", "2", "--url", redis_url, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    # audit still has its first entry pending: nothing can go.
    assert plan == {
        "dry_run": True,
        "stream": stream_name,
        "length": 10,
        "would_delete": 0,
        "keep_from": plan["keep_from"],
        "limited_by_groups": True,
    }
    await redis_client.xack(
        stream_name, "audit", *[e[0] for e in (await redis_client.xrange(stream_name))[:3]]
    )
    await redis_client.xreadgroup("audit", "auditor-1", {stream_name: ">"}, count=5)
    result = cli("trim", stream_name, "--maxlen", "2", "--url", redis_url)
    assert result.returncode == 0, result.stderr
    # audit has entries 4-8 pending: the first three go, not more.
    assert "trimmed 3 of 10 entries" in result.stdout
    assert "a consumer group has not read or acknowledged it yet" in result.stdout
    assert await redis_client.xlen(stream_name) == 7


async def test_prune_deletes_idle_consumers_that_hold_nothing(
    redis_url: str, redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    await redis_client.xadd(stream_name, {"n": 1})
    await redis_client.xgroup_create(stream_name, "g", id="0")
    # "holder" holds the entry; "gone-1" and "gone-2" hold nothing.
    await redis_client.xreadgroup("g", "holder", {stream_name: ">"})
    for name in ("gone-1", "gone-2"):
        await redis_client.xgroup_createconsumer(stream_name, "g", name)

    async def idle_enough() -> bool:
        rows = await redis_client.xinfo_consumers(stream_name, "g")
        return all(row["idle"] >= 200 for row in rows)

    await wait_until(idle_enough, message="every consumer idle 0.2 s")
    dry = cli("prune", stream_name, "g", "--idle", "0.2", "--dry-run", "--json", "--url", redis_url)
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert (plan["dry_run"], sorted(plan["deleted"])) == (True, ["gone-1", "gone-2"])
    assert [c["name"] for c in plan["held"]] == ["holder"]
    assert len(await redis_client.xinfo_consumers(stream_name, "g")) == 3  # nothing changed

    # A long limit deletes nothing.
    kept = cli("prune", stream_name, "g", "--idle", "3600", "--url", redis_url)
    assert kept.returncode == 0, kept.stderr
    assert "deleted 0 consumer(s)" in kept.stdout

    result = cli("prune", stream_name, "g", "--idle", "0.2", "--url", redis_url)
    assert result.returncode == 0, result.stderr
    assert "deleted 2 consumer(s) of group g" in result.stdout
    assert "gone-1" in result.stdout
    assert "gone-2" in result.stdout
    assert "holder" in result.stdout  # listed as kept, with its pending entry
    rows = await redis_client.xinfo_consumers(stream_name, "g")
    assert [row["name"] for row in rows] in (["holder"], [b"holder"])
    assert (await redis_client.xpending(stream_name, "g"))["pending"] == 1


def test_demo_starts_and_stops_its_own_server() -> None:
    result = cli("demo", "--messages", "600", "--rate", "0", "--json", "--progress", "always")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["complete"] is True
    assert summary["published"] == 600
    assert summary["dead_lettered"] == 6
    assert summary["dead_letter_stream_length"] == 6
    assert summary["succeeded"] == 594
    assert summary["pending_after"] == 0
    # 30 flaky messages retried once, 6 poison ones twice.
    assert summary["retried"] == 30 + 12
    assert summary["latency_ms"]["p50"] > 0
    assert "started for the demo" in summary["server"]
    assert "demo [" in result.stderr  # the live progress bar
    assert "100%" in result.stderr


async def test_demo_against_a_url_keeps_keys_for_inspection(
    redis_url: str, redis_client: redis.asyncio.Redis
) -> None:
    result = cli("demo", "--url", redis_url, "--messages", "300", "--keep")
    assert result.returncode == 0, result.stderr
    assert "published      300" in result.stdout
    assert "throughput" in result.stdout
    assert "latency        p50" in result.stdout
    [stream] = [k.decode() for k in await redis_client.keys("streamq-demo:*") if b":dead" not in k]
    assert await redis_client.xlen(stream) == 300
    assert await redis_client.xlen(f"{stream}:dead") == 3
    assert f"streamq dead {stream}" in result.stdout


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the server through /proc")
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_demo_stops_its_server_when_interrupted(signum: int, code: int) -> None:
    proc = subprocess.Popen(
        [STREAMQ, "demo", "--messages", "1000000", "--rate", "2000", "--progress", "never"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 30
        servers: list[int] = []
        while not servers and time.monotonic() < deadline:
            servers = _children(proc.pid)
            time.sleep(0.05)
        assert servers, "the demo started no server"
        time.sleep(0.5)  # let it get busy publishing and consuming
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    for pid in servers:
        assert not Path(f"/proc/{pid}").exists(), "the demo's server outlived it"


def test_bench_prints_throughput_and_latency(redis_url: str) -> None:
    result = cli(
        "bench",
        "--url",
        redis_url,
        "--messages",
        "2000",
        "--latency-rate",
        "1000",
        "--latency-seconds",
        "1",
        "--json",
        "--progress",
        "always",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    names = [r["name"] for r in report["runs"]]
    assert names == ["publish (100 tasks)", "consume (concurrency 100)", "latency at 1,000 msg/s"]
    assert all(r["rate"] > 0 for r in report["runs"])
    assert report["runs"][2]["latency_ms"]["p99"] > 0
    assert [r["pending_after"] for r in report["runs"]] == [0, 0, 0]
    for label in ("publish", "consume", "latency"):
        assert f"{label} [" in result.stderr
    # The scratch streams are gone.
    assert _redis_keys(redis_url, "streamq-bench:*") == []


def test_demo_without_any_server_binary_exits_5(tmp_path: Path) -> None:
    env = _env()
    env["STREAMQ_REDIS_SERVER"] = str(tmp_path / "no-such-redis-server")
    result = subprocess.run(
        [STREAMQ, "demo", "--messages", "10"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 5
    assert "not an executable file" in result.stderr
