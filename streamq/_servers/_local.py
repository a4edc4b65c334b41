"""A single throwaway server process: :class:`LocalRedis`.

It writes a config file into a private temporary directory (which also holds the
log, AOF and cluster nodes file), starts the server on a free 127.0.0.1 port,
waits until it answers PING, and can stop, kill and restart it with the same data.
The process is killed and the directory removed when the object is closed or
garbage collected, at interpreter exit, and (on Linux, when started from the main
thread) when the Python process dies.
"""

from __future__ import annotations

import contextlib
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import redis.asyncio

from ._binaries import ServerBinary, find_server_binary
from ._errors import RespError, ServerStartError, UnsupportedFeatureError
from ._process import (
    _HOST,
    RespReply,
    _free_port,
    _info_fields,
    _pdeathsig_preexec,
    _RespConnection,
)

__all__ = ["LocalRedis"]


def _conf_quote(value: str) -> str:
    escaped = (
        value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{escaped}"'


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
