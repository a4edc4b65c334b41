"""A streamq consumer process for the fault-injection tests.

Run as ``python worker.py CONFIG_JSON``. The handler records every message it
handled successfully by appending ``<stream> <id>\\n`` to ``record`` with one
``write()`` on an ``O_APPEND`` descriptor, *before* returning success: a SIGKILL
can then never lose a record of a message whose ack reached Redis (the kernel
keeps what was written), and a kill between the record and the ack shows up as a
duplicate, which is what at-least-once allows.

Messages with a ``poison`` field misbehave: ``raise`` raises, ``timeout`` sleeps
past ``handler_timeout``, ``exit`` kills the whole process with ``os._exit``.
Every error the consumer reports is appended to ``events`` as a JSON line, so the
tests can assert on reports (``GroupRecreatedError``, ``MessageLostError``...).
SIGTERM closes the consumer gracefully (``aclose()``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

from streamq import AsyncConsumer, Backoff, Message


def _open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


async def main(cfg: dict[str, Any]) -> int:
    record = _open_append(cfg["record"])
    events = _open_append(cfg["events"])
    delay = float(cfg.get("delay", 0.0))

    def event(**fields: Any) -> None:
        os.write(events, (json.dumps({"consumer": cfg["consumer"], **fields}) + "\n").encode())

    async def handle(msg: Message) -> None:
        kind = msg.values.get("poison")
        if kind == b"raise":
            raise RuntimeError(f"poison {msg.id}")
        if kind == b"timeout":
            await asyncio.sleep(3600)
        if kind == b"exit":
            os._exit(17)
        if delay:
            await asyncio.sleep(delay)
        os.write(record, f"{msg.stream} {msg.id}\n".encode())

    options = dict(cfg.get("options", {}))
    if "backoff" in options:
        options["backoff"] = Backoff(**options["backoff"])
    consumer = AsyncConsumer(
        redis=cfg["url"], group=cfg["group"], consumer=cfg["consumer"], **options
    )
    for stream in cfg["streams"]:
        consumer.subscribe(stream, handle)

    async def report_errors() -> None:
        async for err in consumer.errors():
            event(event="error", type=type(err).__name__, text=str(err)[:300])

    loop = asyncio.get_running_loop()
    closing: list[asyncio.Task[None]] = []
    loop.add_signal_handler(
        signal.SIGTERM, lambda: closing.append(asyncio.ensure_future(consumer.aclose()))
    )
    # SIGUSR1 prints every task's stack: what a hung worker is waiting for.
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
    reporter = asyncio.ensure_future(report_errors())
    event(event="started", pid=os.getpid())
    try:
        await consumer.listen()
    except Exception as exc:
        event(event="fatal", type=type(exc).__name__, text=str(exc)[:300])
        return 2
    finally:
        await reporter
        if closing:
            await asyncio.gather(*closing)
    stats = consumer.stats()
    event(event="stopped", handled=stats.handled, acked=stats.acked)
    return 0


def _dump_tasks() -> None:
    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}", file=sys.stderr)
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(json.loads(sys.argv[1]))))
