"""A web service on streamq: publish from a request handler, consume in the app's lifespan.

Run it against a Redis at REDIS_URL::

    pip install 'streamq[examples]' uvicorn
    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.fastapi_app:app

    curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"id": "A-1", "amount": 9.5}'
    curl localhost:8000/health

``POST /orders`` answers 202 as soon as Redis stored the order; the consumer
running inside the same app bills it (a real service would call a payment API).
Several replicas of the app share the work through the consumer group, and an
order whose replica dies mid-way is claimed by another one.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

import redis.asyncio as redis
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from streamq import AsyncConsumer, AsyncPublisher, ConsumerState, JsonCodec, Message


class Order(BaseModel):
    """What clients post and what travels through the stream (as JSON in one field)."""

    id: str = Field(min_length=1)
    amount: float = Field(gt=0)


orders = JsonCodec(Order)


def create_app(
    redis_url: str | None = None, *, stream: str = "orders", group: str = "billing"
) -> FastAPI:
    """Build the app; nothing connects until the lifespan starts."""
    url = redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

    async def bill(order: Order, msg: Message) -> None:
        # Handlers must be idempotent (delivery is at least once): a real service
        # would pass order.id as the payment provider's idempotency key.
        app.state.billed[order.id] = order.amount

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis.Redis.from_url(url)
        consumer = AsyncConsumer(
            redis=client,
            group=group,
            # One consumer name per replica: a pod name in Kubernetes.
            consumer=os.environ.get("HOSTNAME", socket.gethostname()) + f"-{os.getpid()}",
            start_id="0",
        )
        consumer.subscribe(stream, orders.handler(bill))
        app.state.billed = {}
        try:
            # Leaving this block stops reading, lets running handlers finish,
            # and flushes the last acks before the process exits.
            async with AsyncPublisher(redis=client) as publisher, consumer:
                app.state.publisher = publisher
                app.state.consumer = consumer
                yield
        finally:
            await client.aclose()

    app = FastAPI(title="orders", lifespan=lifespan)

    @app.post("/orders", status_code=202)
    async def create_order(order: Order) -> dict[str, str]:
        entry_id = await app.state.publisher.publish(orders.message(stream, order))
        return {"status": "accepted", "entry_id": entry_id}

    @app.get("/health")
    async def health() -> JSONResponse:
        consumer: AsyncConsumer = app.state.consumer
        stats = consumer.stats()
        running = stats.state is ConsumerState.RUNNING
        body: dict[str, Any] = {
            "status": "ok" if running else "unavailable",
            "consumer": {**asdict(stats), "state": stats.state.value},
            "billed": len(app.state.billed),
        }
        return JSONResponse(body, status_code=200 if running else 503)

    return app


app = create_app()
