"""AUTH passwords, a least-privilege ACL user, TLS, and payloads that are never executed.

The minimal ACL streamq needs (the test below runs the whole workload with exactly
this user, and proves each command in it is needed by taking it away)::

    user streamq on >PASSWORD ~orders ~orders:dead
        +info +xreadgroup +xack +xclaim +xpending +xgroup|create +xlen +xrange +xadd
        +xinfo|groups +xtrim

``~orders:dead`` and the consumer commands are for consumers; a publisher needs
``+xadd`` on ``~orders`` only, plus ``+xlen +xinfo|groups +xpending +xrange +xtrim``
with ``safe_trim``. ``+command|info`` is optional: without it streamq skips the
probe for renamed commands.
"""

from __future__ import annotations

import ast
import asyncio
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeServer
from faults.harness import group_caught_up, pending_count, wait_until

import streamq
from streamq import (
    AsyncConsumer,
    AsyncPublisher,
    Backoff,
    Message,
    RedisError,
    StreamqError,
)
from streamq._servers import LocalRedis

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

FAST = Backoff(min=0.01, max=0.05)

CONSUMER_RULES = (
    "+info",
    "+xreadgroup",
    "+xack",
    "+xclaim",
    "+xpending",
    "+xgroup|create",
    "+xlen",
    "+xrange",
    "+xadd",
)
SAFE_TRIM_RULES = ("+xlen", "+xinfo|groups", "+xpending", "+xrange", "+xtrim")
MINIMAL_RULES = tuple(dict.fromkeys(CONSUMER_RULES + SAFE_TRIM_RULES))
KEY_RULES = ("~orders", "~orders:dead")


def _consumer(redis: Any, **kw: object) -> AsyncConsumer:
    options: dict[str, object] = {
        "group": "g",
        "consumer": "c1",
        "start_id": "0",
        "read_timeout": 0.2,
        "backoff": FAST,
    }
    options.update(kw)
    return AsyncConsumer(redis=redis, **options)


async def _round_trip(consumer_redis: Any, publisher_redis: Any, server: LocalRedis) -> None:
    """Publish three messages, consume them, and check Redis has nothing pending."""
    handled: list[str] = []

    async def handler(msg: Message) -> None:
        handled.append(msg.id)

    consumer = _consumer(consumer_redis)
    consumer.subscribe("orders", handler)
    async with AsyncPublisher(redis=publisher_redis) as publisher, consumer:
        ids = [await publisher.publish(Message("orders", {"n": i})) for i in range(3)]

        async def done() -> bool:
            return set(ids) <= set(handled) and group_caught_up(server, "orders")

        await wait_until(done, 10, "the messages were handled and acked")


async def test_auth_password(make_server: MakeServer) -> None:
    server = make_server(password="s3cret pass/word")
    # A URL (password percent-encoded) and a client built by the application.
    client = server.client()
    try:
        await _round_trip(server.url, client, server)
    finally:
        await client.aclose()


async def test_a_wrong_password_is_fatal_at_once(make_server: MakeServer) -> None:
    server = make_server(password="right")

    async def handler(msg: Message) -> None:
        return None

    consumer = _consumer(server.url_for(password="wrong"), network_retry=-1)
    consumer.subscribe("orders", handler)
    # Not a network error: retrying a wrong password only hammers the server.
    with pytest.raises(RedisError, match=r"(?i)invalid|WRONGPASS|auth"):
        await asyncio.wait_for(consumer.listen(), 10)
    assert consumer.errors().statistics().reported == 0


class _Outcome:
    """What the ACL workload did: reports, the fatal error, and what got through."""

    def __init__(self) -> None:
        self.reports: list[StreamqError] = []
        self.fatal: BaseException | None = None
        self.handled: set[str] = set()
        self.after: list[str] = []
        self.consumer: AsyncConsumer | None = None
        self.publisher: AsyncPublisher | None = None

    def refused(self, command: str) -> bool:
        """Whether Redis refused ``command`` (NOPERM), fatally or in a report."""
        errors = [*self.reports, *([self.fatal] if self.fatal is not None else [])]
        # Redis 6.2 names the parent of a denied subcommand ("the 'xgroup' command or
        # its subcommand"); 7.0+ and Valkey name the subcommand ("'xgroup|create'").
        names = {command, command.partition("|")[0]}
        return any(f"run the '{name}' command" in str(e) for e in errors for name in names)


async def _acl_workload(server: LocalRedis, rules: tuple[str, ...]) -> _Outcome:
    """Everything streamq does, as the ACL user ``streamq`` holding ``rules``.

    Recovery of its own pending entries, claiming a dead consumer's, handler retries,
    dead-lettering, recreating a deleted group, safe trimming.
    """
    server.execute("ACL", "SETUSER", "streamq", "reset", "on", ">pw", *KEY_RULES, *rules)
    server.execute("DEL", "orders", "orders:dead")
    server.execute("ACL", "LOG", "RESET")
    # Set up by an administrator: entries pending under a dead consumer and under c1.
    server.execute("XGROUP", "CREATE", "orders", "g", "0", "MKSTREAM")
    for i in range(4):
        server.execute("XADD", "orders", "*", "pre", str(i))
    server.execute("XREADGROUP", "GROUP", "g", "dead", "COUNT", 2, "STREAMS", "orders", ">")
    server.execute("XREADGROUP", "GROUP", "g", "c1", "COUNT", 2, "STREAMS", "orders", ">")
    url = server.url_for(username="streamq", password="pw")
    out = _Outcome()

    async def handler(msg: Message) -> None:
        if msg.values.get("poison"):
            raise RuntimeError("poison")
        out.handled.add(msg.id)

    consumer = out.consumer = _consumer(
        url,
        max_retry=1,
        pending_timeout=0.3,
        handler_timeout=0.2,
        claim_interval=0.1,
        network_retry=0,
    )
    consumer.subscribe("orders", handler)
    publisher = out.publisher = AsyncPublisher(
        redis=url, safe_trim=True, stream_max_length=10, network_retry=0
    )

    def running() -> bool:
        return consumer.state.value == "running"

    try:
        async with publisher, consumer:
            ids = []
            for i in range(40):
                poison = {"poison": 1} if i == 3 else {}
                ids.append(await publisher.publish(Message("orders", {"i": i, **poison})))

            async def settled() -> bool:
                caught_up = set(ids) - out.handled <= {ids[3]}
                return not running() or (caught_up and pending_count(server, "orders") == 0)

            await wait_until(settled, 10, "the first batch settled")
            server.execute("XGROUP", "DESTROY", "orders", "g")
            for i in range(3):
                out.after.append(await publisher.publish(Message("orders", {"after": i})))

            async def recovered() -> bool:
                return not running() or set(out.after) <= out.handled

            await wait_until(recovered, 10, "handled after the group was recreated")
            for owner in (consumer, publisher):
                while (err := owner.errors().get_nowait()) is not None:
                    out.reports.append(err)
    except StreamqError as exc:
        out.fatal = exc
    return out


async def test_the_minimal_acl_is_enough(redis_server: LocalRedis) -> None:
    try:
        out = await _acl_workload(redis_server, MINIMAL_RULES)
        log = redis_server.execute("ACL", "LOG")
    finally:
        redis_server.execute("ACL", "DELUSER", "streamq")
    assert out.fatal is None
    assert out.consumer is not None
    assert out.publisher is not None
    denied = {dict(zip(row[::2], row[1::2], strict=True))["object"] for row in log or []}  # type: ignore[index,union-attr]
    # COMMAND INFO (the probe for renamed commands) is optional and skipped when denied;
    # so is redis-py's CLIENT SETINFO at connect (known to Redis 7.2+ and Valkey; 6.2
    # logs a denied subcommand under its parent's name).
    assert denied <= {"command|info", "client|setinfo", "command", "client"}, denied
    assert not [e for e in out.reports if "permission" in str(e)]
    assert set(out.after) <= out.handled
    assert int(redis_server.execute("XLEN", "orders:dead")) == 1  # type: ignore[arg-type]
    assert out.publisher.stats().trims > 0
    assert out.consumer.stats().claimed > 0
    assert out.consumer.stats().recovered > 0


@pytest.mark.parametrize("missing", MINIMAL_RULES)
async def test_every_command_of_the_minimal_acl_is_needed(
    redis_server: LocalRedis, missing: str
) -> None:
    rules = tuple(r for r in MINIMAL_RULES if r != missing)
    try:
        out = await _acl_workload(redis_server, rules)
    finally:
        redis_server.execute("ACL", "DELUSER", "streamq")
    # Refused with a clear NOPERM: fatal for the consumer, reported by safe trimming.
    assert out.refused(missing.removeprefix("+")), (out.fatal, out.reports)


async def test_tls(make_server: MakeServer) -> None:
    try:
        server = make_server(tls=True)
    except Exception as exc:  # a binary built without TLS
        pytest.skip(f"no TLS: {exc}")
    client = server.client()  # ssl=True, trusting the throwaway CA
    url = f"{server.url}?ssl_ca_certs={server.ca_path}"
    assert url.startswith("rediss://")
    try:
        await _round_trip(url, client, server)
    finally:
        await client.aclose()
    # Plain text to a TLS port fails clearly instead of hanging or looping.
    plain = f"redis://127.0.0.1:{server.port}/0"

    async def handler(msg: Message) -> None:
        return None

    consumer = _consumer(plain, network_retry=1, command_timeout=1.0)
    consumer.subscribe("orders", handler)
    with pytest.raises(StreamqError):
        await asyncio.wait_for(consumer.listen(), 10)


class _Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch /tmp/streamq-was-unpickled",))


async def test_payloads_are_never_unpickled(redis_server: LocalRedis, stream_name: str) -> None:
    marker = Path("/tmp/streamq-was-unpickled")
    marker.unlink(missing_ok=True)
    evil = pickle.dumps(_Boom())
    code = b"__import__('os').system('touch /tmp/streamq-was-unpickled')"
    got: list[Message] = []

    async def handler(msg: Message) -> None:
        got.append(msg)

    consumer = _consumer(redis_server.url)
    consumer.subscribe(stream_name, handler)
    async with AsyncPublisher(redis=redis_server.url) as publisher, consumer:
        await publisher.publish(Message(stream_name, {"pickle": evil, "code": code}))
        await wait_until(lambda: _async_bool(bool(got)), 10, "handled")
    assert got[0].values == {"pickle": evil, "code": code}
    assert not marker.exists()


def test_the_package_has_no_unpickling_or_eval() -> None:
    """No module of streamq imports a deserializer that runs code, or calls eval/exec."""
    forbidden_modules = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}
    forbidden_calls = {"eval", "exec", "compile", "__import__"}
    found: list[str] = []
    for path in sorted(Path(streamq.__file__).parent.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id in forbidden_calls:
                    found.append(f"{path.name}:{node.lineno}: {node.func.id}()")
                continue
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"load", "loads"}
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in {"yaml", "pickle", "marshal"}
            ):
                found.append(f"{path.name}:{node.lineno}: {node.func.value.id}.{node.func.attr}")
                continue
            else:
                continue
            bad = [n for n in names if n in forbidden_modules]
            found += [f"{path.name}:{node.lineno}: import {n}" for n in bad]
    assert found == []


async def _async_bool(value: bool) -> bool:
    return value


PRUNE_RULES = ("+eval", "+exists", "+xinfo|consumers", "+xgroup|delconsumer")


async def _prune_as_acl_user(
    server: LocalRedis, rules: tuple[str, ...]
) -> tuple[AsyncConsumer, StreamqError | None]:
    server.execute("ACL", "SETUSER", "streamq", "reset", "on", ">pw", *KEY_RULES, *rules)
    server.execute("DEL", "orders", "orders:dead")
    server.execute("XGROUP", "CREATE", "orders", "g", "0", "MKSTREAM")
    server.execute("XGROUP", "CREATECONSUMER", "orders", "g", "gone")

    async def handler(msg: Message) -> None:
        pass

    url = server.url_for(username="streamq", password="pw")
    consumer = _consumer(url, read_timeout=0.05, prune_consumers_after=0.2, network_retry=0)
    consumer.subscribe("orders", handler)
    task = asyncio.create_task(consumer.listen())
    fatal: StreamqError | None = None
    try:

        async def over() -> bool:
            return consumer.stats().pruned > 0 or task.done()

        await wait_until(over, 10, "a pruning round")
    finally:
        await consumer.aclose()
        try:
            await task
        except StreamqError as exc:
            fatal = exc
    return consumer, fatal


async def test_pruning_needs_exactly_its_documented_commands(redis_server: LocalRedis) -> None:
    try:
        consumer, fatal = await _prune_as_acl_user(redis_server, MINIMAL_RULES + PRUNE_RULES)
        assert fatal is None
        assert consumer.stats().pruned == 1
        rows = redis_server.execute("XINFO", "CONSUMERS", "orders", "g")
        assert [dict(zip(r[::2], r[1::2], strict=True))["name"] for r in rows] == ["c1"]  # type: ignore[union-attr,index]
        for missing in PRUNE_RULES:
            rules = MINIMAL_RULES + tuple(r for r in PRUNE_RULES if r != missing)
            refused, fatal = await _prune_as_acl_user(redis_server, rules)
            assert refused.stats().pruned == 0, missing
            # Fatal at once, naming the refusal: a silent no-op would hide the leak.
            assert isinstance(fatal, RedisError), (missing, fatal)
            assert "prune consumers of orders" in str(fatal), (missing, fatal)
    finally:
        redis_server.execute("ACL", "DELUSER", "streamq")


async def test_idempotent_publishing_needs_xrevrange_and_xrange(
    redis_server: LocalRedis, make_proxy: Any
) -> None:
    proxy = await make_proxy(redis_server)
    url = proxy.url(username="streamq", password="pw")
    try:
        for rules, stored_once in (
            (("+xadd", "+xrevrange", "+xrange"), True),
            (("+xadd",), False),
        ):
            redis_server.execute(
                "ACL", "SETUSER", "streamq", "reset", "on", ">pw", "~orders", *rules
            )
            redis_server.execute("DEL", "orders")
            options = {"idempotent": True, "backoff": FAST, "network_retry": 3}
            async with AsyncPublisher(redis=url, **options) as publisher:
                await publisher.publish(Message("orders", {"n": 0}, id="1-1"))  # connected
                proxy.lose_replies(1)
                if stored_once:
                    assert await publisher.publish(Message("orders", {"n": 1})) != "1-1"
                    assert redis_server.execute("XLEN", "orders") == 2
                else:
                    # The lookup is refused: the publish fails loudly, it is not resent blind.
                    with pytest.raises(RedisError, match="XADD"):
                        await publisher.publish(Message("orders", {"n": 1}))
                    assert redis_server.execute("XLEN", "orders") == 2
    finally:
        redis_server.execute("ACL", "DELUSER", "streamq")
