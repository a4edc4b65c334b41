"""What the fault-injection tests share: consumer processes, records and polling."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from streamq._servers import LocalRedis
from streamq._servers._process import _pdeathsig_preexec

WORKER = Path(__file__).with_name("worker.py")

# Every Worker made in this process, so that none outlives a failed test (see
# kill_all, called after each test by conftest.py).
_WORKERS: list[Worker] = []


def kill_all() -> None:
    """SIGKILL and reap every worker process still running."""
    while _WORKERS:
        _WORKERS.pop().kill()


# Small timings so that every recovery path (claiming, retries, reconnects) runs
# many times in a test of a few seconds. handler_timeout <= pending_timeout, as the
# options require while claiming is on.
FAST_OPTIONS: dict[str, Any] = {
    "read_timeout": 0.5,
    "handler_timeout": 0.5,
    "pending_timeout": 1.5,
    "claim_interval": 0.25,
    "max_retry": 2,
    "concurrency": 4,
    "buffer_size": 4,
    "backoff": {"min": 0.02, "max": 0.3},
    "network_retry": -1,
    "command_timeout": 1.0,
    "start_id": "0",
    "shutdown_timeout": 2.0,
}


async def wait_until(
    predicate: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(interval)


class Worker:
    """One consumer process (``worker.py``) that can be killed and restarted by name.

    Records go to ``<workdir>/<name>.handled`` and events to ``<name>.events``;
    both survive restarts, so they tell the whole history of the name.
    """

    def __init__(
        self,
        workdir: Path,
        name: str,
        url: str,
        streams: list[str],
        *,
        group: str = "g",
        options: dict[str, Any] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.name = name
        self.record = workdir / f"{name}.handled"
        self.events_path = workdir / f"{name}.events"
        self.stderr_path = workdir / f"{name}.stderr"
        self.config = {
            "url": url,
            "group": group,
            "consumer": name,
            "streams": streams,
            "record": str(self.record),
            "events": str(self.events_path),
            "options": {**FAST_OPTIONS, **(options or {})},
            "delay": delay,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        _WORKERS.append(self)

    def start(self) -> Worker:
        """Start the process (again) under the same consumer name."""
        assert self.proc is None or self.proc.poll() is not None
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), json.dumps(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                # Dies with pytest, even when pytest is SIGKILLed.
                preexec_fn=_pdeathsig_preexec(),
            )
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        """Whether the process is running."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.kills += 1
        if self.proc is not None:
            self.proc.wait()

    def started(self) -> bool:
        """Whether the current process is up (its SIGTERM handler installed)."""
        pid = self.proc.pid if self.proc is not None else None
        return any(e["event"] == "started" and e.get("pid") == pid for e in self.events())

    async def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful ``aclose()``), wait for the exit, and return the exit code."""
        proc = self.proc
        if proc is None:
            return None
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not self.started():
            # A SIGTERM before the handler is installed kills instead of closing.
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.send_signal(signal.SIGUSR1)
                await asyncio.sleep(0.5)
                proc.kill()
                proc.wait()
                raise AssertionError(
                    f"{self.name} ignored SIGTERM for {timeout} s; stderr:\n{self.stderr()}"
                )
            await asyncio.sleep(0.02)
        return proc.returncode

    def handled(self) -> list[str]:
        """IDs this name recorded as handled, in order, with repeats."""
        try:
            text = self.record.read_text()
        except FileNotFoundError:
            return []
        return [line.split()[1] for line in text.splitlines() if line.strip()]

    def events(self) -> list[dict[str, Any]]:
        """The JSON events the processes of this name wrote."""
        try:
            text = self.events_path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            # A SIGKILL can cut a line in half; such a line tells nothing.
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def error_types(self) -> Counter[str]:
        """How many errors of each type the processes of this name reported."""
        return Counter(e["type"] for e in self.events() if e["event"] == "error")

    def stderr(self) -> str:
        """What the processes of this name printed to stderr (for failure messages)."""
        try:
            return self.stderr_path.read_text()[-3000:]
        except FileNotFoundError:
            return ""


def pending_count(server: LocalRedis, stream: str, group: str = "g") -> int:
    """Entries pending in ``group`` (0 when the group or stream does not exist)."""
    try:
        summary = server.execute("XPENDING", stream, group)
    except Exception:
        return 0
    assert isinstance(summary, list)
    return int(summary[0])  # type: ignore[arg-type]


def pending_by_consumer(server: LocalRedis, stream: str, group: str = "g") -> dict[str, list[str]]:
    """Pending entry IDs per consumer name."""
    rows = server.execute("XPENDING", stream, group, "-", "+", 100000)
    out: dict[str, list[str]] = {}
    for row in rows or []:  # type: ignore[union-attr]
        out.setdefault(row[1], []).append(row[0])  # type: ignore[index]
    return out


def stream_ids(server: LocalRedis, stream: str) -> list[str]:
    """Every entry ID of ``stream``, oldest first."""
    rows = server.execute("XRANGE", stream, "-", "+")
    return [row[0] for row in rows or []]  # type: ignore[union-attr,index]


def dead_letters(server: LocalRedis, stream: str) -> dict[str, dict[str, str]]:
    """Entries of ``stream``'s dead-letter stream, by original ID."""
    rows = server.execute("XRANGE", f"{stream}:dead", "-", "+")
    out: dict[str, dict[str, str]] = {}
    for _, flat in rows or []:  # type: ignore[union-attr]
        fields = dict(zip(flat[::2], flat[1::2], strict=True))  # type: ignore[index]
        out[fields["streamq-original-id"]] = fields
    return out


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def env_seconds(name: str, default: float) -> float:
    """A duration from the environment (soak runs), else ``default``."""
    value = os.environ.get(name)
    return float(value) if value else default


def consumer_seen(server: LocalRedis, stream: str, name: str = "c1", group: str = "g"):  # type: ignore[no-untyped-def]
    """A predicate for :func:`wait_until`: ``name`` has read from ``stream`` (XINFO CONSUMERS)."""

    async def check() -> bool:
        try:
            rows = server.execute("XINFO", "CONSUMERS", stream, group)
        except Exception:
            return False
        return any(name in row for row in rows or [])  # type: ignore[operator,union-attr]

    return check


def group_caught_up(server: LocalRedis, stream: str, group: str = "g") -> bool:
    """Whether ``group`` has read every entry of ``stream`` and has nothing pending."""
    try:
        info = server.execute("XINFO", "STREAM", stream)
        rows = server.execute("XINFO", "GROUPS", stream)
    except Exception:
        return False
    assert isinstance(info, list)
    assert isinstance(rows, list)
    last = dict(zip(info[::2], info[1::2], strict=True))["last-generated-id"]
    for row in rows:
        fields = dict(zip(row[::2], row[1::2], strict=True))  # type: ignore[index]
        if fields["name"] == group:
            return bool(fields["pending"] == 0 and fields["last-delivered-id"] == last)
    return False
