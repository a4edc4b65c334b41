"""An asyncio TCP proxy that injects network faults between a client and a server.

Loopback only and meant for tests: put a :class:`FaultProxy` in front of a server,
point the client at ``proxy.url()``, then cut connections, add latency, stall
traffic or refuse new connections while the test runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType
from typing import Self
from urllib.parse import quote

__all__ = ["FaultProxy"]

_HOST = "127.0.0.1"
_CHUNK = 65536


def _reset_on_close(writer: asyncio.StreamWriter) -> None:
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN, which is
    # what a peer sees when a NAT drops state or a host reboots: an abrupt reset.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Connection:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None

    def abort(self, *, reset: bool) -> None:
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            if reset:
                _reset_on_close(writer)
            writer.transport.abort()


class FaultProxy:
    """Forward TCP connections from a free 127.0.0.1 port to a target, with faults on demand.

    Attributes:
        target_host: Where connections are forwarded to.
        target_port: Where connections are forwarded to.
        connections_accepted: Client connections accepted so far (refused ones included).
        connections_cut: Connections reset by :meth:`cut`.
        connections_refused: Connections closed at once because of :meth:`refuse`.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        """Prepare a proxy; call :meth:`start` (or use ``async with``) to listen.

        Args:
            target_host: Host of the server to forward to.
            target_port: Port of the server to forward to.
        """
        self.target_host = target_host
        self.target_port = target_port
        self.connections_accepted = 0
        self.connections_cut = 0
        self.connections_refused = 0
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._delay = 0.0
        self._refusing = False
        # Replies still to swallow (each then resets its connection): lose_replies().
        self._replies_to_lose = 0
        self.replies_lost = 0
        # Set while traffic flows; cleared by blackhole(True) so pumps park on wait().
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> Self:
        """Listen on a free 127.0.0.1 port.

        Returns:
            ``self``.
        """
        if self._server is not None:
            return self
        self._server = await asyncio.start_server(self._on_accept, _HOST, 0)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening, abort every connection and wait for all proxy tasks to end."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self._connections):
            conn.abort(reset=False)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- addressing ---------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The proxy's listening host (always 127.0.0.1)."""
        return _HOST

    @property
    def port(self) -> int:
        """The proxy's listening port."""
        if self._port is None:
            raise RuntimeError("the proxy has not been started")
        return self._port

    def url(
        self,
        db: int = 0,
        *,
        password: str | None = None,
        username: str | None = None,
        scheme: str = "redis",
    ) -> str:
        """A redis URL that goes through the proxy.

        Args:
            db: Database number.
            password: Password to embed.
            username: ACL user name to embed.
            scheme: ``"redis"``, or ``"rediss"`` for a TLS server behind the proxy.

        Returns:
            The URL.
        """
        auth = ""
        if password is not None or username is not None:
            auth = f"{quote(username or '', safe='')}:{quote(password or '', safe='')}@"
        return f"{scheme}://{auth}{self.host}:{self.port}/{db}"

    @property
    def active_connections(self) -> int:
        """Connections currently open through the proxy."""
        return len(self._connections)

    # -- faults -------------------------------------------------------------------------

    def cut(self) -> int:
        """Reset every open connection now (RST to both sides).

        Returns:
            How many connections were cut.
        """
        conns = list(self._connections)
        for conn in conns:
            conn.abort(reset=True)
            self._connections.discard(conn)
        self.connections_cut += len(conns)
        return len(conns)

    def set_delay(self, seconds: float) -> None:
        """Delay every chunk by ``seconds`` in both directions (0 to turn off).

        Chunks on one connection are delayed one after the other, so a stream of
        many small writes is slowed more than a single round trip.
        """
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._delay = seconds

    def blackhole(self, on: bool = True) -> None:
        """Stall traffic: keep accepting and reading, but forward nothing.

        Data read meanwhile is held, not dropped, and delivered when the blackhole is
        turned off, like TCP after a healed partition. New connections are accepted
        but not connected upstream until then.
        """
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    def lose_replies(self, count: int = 1) -> None:
        """Swallow the next ``count`` chunks the server sends, resetting each connection.

        The request has reached the server and run; the client sees its connection
        reset instead of the reply: the ambiguous failure after which nobody knows
        whether a write happened.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        self._replies_to_lose = count

    def refuse(self, on: bool = True) -> None:
        """Close (reset) new connections as soon as they are accepted; open ones stay."""
        self._refusing = on

    # -- internals ----------------------------------------------------------------------

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: asyncio would wrap a coroutine in a task
        # that stop() could not see, let alone cancel.
        self.connections_accepted += 1
        if self._refusing or self._server is None:
            self.connections_refused += 1
            _reset_on_close(writer)
            writer.transport.abort()
            return
        conn = _Connection(writer)
        self._connections.add(conn)
        task = asyncio.get_running_loop().create_task(self._serve(conn, reader))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: _Connection, client_reader: asyncio.StreamReader) -> None:
        try:
            await self._flowing.wait()
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                _reset_on_close(conn.client)
                return
            conn.upstream = up_writer
            if conn not in self._connections:
                # Cut while we were connecting.
                return
            pumps = [
                asyncio.ensure_future(self._pump(client_reader, up_writer)),
                asyncio.ensure_future(self._pump(up_reader, conn.client, conn)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._connections.discard(conn)
            conn.abort(reset=False)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        replies_of: _Connection | None = None,
    ) -> None:
        # Redis never half-closes, so either side ending ends the whole connection.
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    return
                await self._flowing.wait()
                if self._delay:
                    await asyncio.sleep(self._delay)
                    await self._flowing.wait()
                if writer.is_closing():
                    return
                if replies_of is not None and self._replies_to_lose:
                    self._replies_to_lose -= 1
                    self.replies_lost += 1
                    self._connections.discard(replies_of)
                    replies_of.abort(reset=True)
                    return
                writer.write(data)
                await writer.drain()
