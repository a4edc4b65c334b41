"""examples/fastapi_app.py, driven through ASGI (lifespan included) against a real Redis."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import redis.asyncio
from asgi_lifespan import LifespanManager

from streamq.testing import wait_until

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).parent.parent / "examples" / "fastapi_app.py"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastapi_app_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the model's annotations through it
    spec.loader.exec_module(module)
    return module


async def test_publish_from_a_request_and_consume_in_the_lifespan(
    example: Any, redis_url: str, redis_client: redis.asyncio.Redis, stream_name: str
) -> None:
    app = example.create_app(redis_url, stream=stream_name)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://orders.test"
        ) as http,
    ):
        health = await http.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"

        for i in range(5):
            response = await http.post("/orders", json={"id": f"A-{i}", "amount": 10 + i})
            assert response.status_code == 202
            assert response.json()["entry_id"]
        invalid = await http.post("/orders", json={"id": "", "amount": -1})
        assert invalid.status_code == 422

        async def all_billed() -> bool:
            body = (await http.get("/health")).json()
            return bool(body["billed"] == 5 and body["consumer"]["acked"] == 5)

        await wait_until(all_billed, timeout=10)
        assert app.state.billed == {f"A-{i}": 10.0 + i for i in range(5)}

    # After shutdown: every order acknowledged, the group's consumer registered.
    assert await redis_client.xlen(stream_name) == 5
    assert (await redis_client.xpending(stream_name, "billing"))["pending"] == 0
    [group] = await redis_client.xinfo_groups(stream_name)
    [(last_id, _)] = await redis_client.xrevrange(stream_name, count=1)
    assert group["last-delivered-id"] == last_id
    assert app.state.consumer.stats().state.value == "closed"


async def test_health_reports_unavailable_when_the_consumer_stopped(
    example: Any, redis_url: str, stream_name: str
) -> None:
    app = example.create_app(redis_url, stream=stream_name)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://orders.test"
        ) as http,
    ):
        await app.state.consumer.aclose()
        response = await http.get("/health")
        assert response.status_code == 503
        assert response.json()["consumer"]["state"] == "closed"
