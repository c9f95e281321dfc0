"""The relay's HTTP/1.1 client: kept-alive connections to engine replicas' ports (httptools).

The relay's hop is always the same exchange: one `POST` of a JSON body to a replica's own
port, the answer's head, then its body as it arrives. `EnginePool` does that and no more, on
asyncio protocols with httptools' parser (the one uvicorn uses), because a general client costs
about twice its CPU per streamed answer on this path (the overhead benchmark's `ours` row):

- one connection per request in flight, kept for the next request to the same port (LIFO),
  dropped after `idle_s` unused, when the answer is not read to its end, or when the engine
  asks to close it;
- a kept connection the engine closed meanwhile fails before any byte of an answer: the
  request goes again once, on a new connection;
- `timeout_s`: the longest wait for bytes of an answer (its head, or its body's next ones)
  while nothing is buffered for the reader; one timer per answer, re-armed only when it fires;
- the reader is told of a broken connection (`ConnectionError`) or a stall (`TimeoutError`)
  after the bytes that came before it; reading pauses while `PAUSE_BYTES` are buffered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import httptools

PAUSE_BYTES = 1 << 18


class Stopped(ConnectionAbortedError):
    """The ingress stopped reading an answer (`EngineResponse.abort`)."""


class EngineResponse:
    """An engine's answer: its status and headers (names in lower case) once `post` returns,
    its body through `read` or `chunks`; `release` once done with it."""

    def __init__(self, connection: _Connection, timeout_s: float) -> None:
        self._connection = connection
        self._loop = connection.loop
        self._parser = httptools.HttpResponseParser(self)
        self._timeout_s = timeout_s
        self.status = 0
        self.headers: dict[str, str] = {}
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._complete = False
        self._keep_alive = False
        self._error: BaseException | None = None
        self._head: asyncio.Future[None] = self._loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._body: bytes | None = None
        self._released = False
        self._last_bytes_at = self._loop.time()
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(
            self._last_bytes_at + timeout_s, self._check_stall
        )

    @property
    def content_type(self) -> str:
        """The media type of `content-type`, without its parameters."""
        value = self.headers.get("content-type", "application/octet-stream")
        return value.partition(";")[0].strip().lower()

    async def read(self) -> bytes:
        """The whole body (kept: a second call returns it again)."""
        if self._body is None:
            self._body = b"".join([piece async for piece in self.chunks()])
        return self._body

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: every piece buffered so far, joined, per step."""
        while True:
            if self._pieces:
                pieces, self._pieces, self._buffered = self._pieces, [], 0
                if self._paused:
                    self._paused = False
                    self._connection.resume_reading()
                yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
            elif self._complete:
                return
            elif self._error is not None:
                raise self._error
            else:
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None

    def abort(self) -> None:
        """Stop the answer: what is buffered is still read, then `chunks` raises `Stopped`; the
        connection is closed (the engine drops the request)."""
        self._fail(Stopped("the ingress stopped reading the answer"))
        self._connection.close()

    def release(self) -> None:
        """Done with the answer: its connection is kept for the next request when the answer
        was read to its end (and the engine keeps it open), else closed."""
        if self._released:
            return
        self._released = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        connection = self._connection
        connection.response = None
        if self._complete and self._keep_alive and self._error is None:
            connection.pool.keep(connection)
        else:
            connection.close()

    # -- httptools' callbacks -----------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)
        self._buffered += len(body)
        if self._buffered > PAUSE_BYTES and not self._paused:
            self._paused = True
            self._connection.pause_reading()

    def on_message_complete(self) -> None:
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()

    # -- the connection's news ----------------------------------------------------------------
    def _received(self, data: bytes) -> None:
        self._last_bytes_at = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"the engine's answer is not valid HTTP: {exc}"))
            self._connection.close()
            return
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._complete or self._error is not None:
            return
        self._error = error
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved here: `post` re-raises it or it is moot
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_stall(self) -> None:
        self._timer = None
        if self._complete or self._error is not None:
            return
        now = self._loop.time()
        if self._paused:  # the reader is behind, not the engine
            self._last_bytes_at = now
        elif now - self._last_bytes_at >= self._timeout_s:
            self._fail(TimeoutError(f"no bytes from the engine for {self._timeout_s:g} s"))
            self._connection.close()
            return
        self._timer = self._loop.call_at(self._last_bytes_at + self._timeout_s, self._check_stall)


class _Connection(asyncio.Protocol):
    """One connection to an engine port; `response` is the answer it is reading, if any."""

    def __init__(self, pool: EnginePool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.response: EngineResponse | None = None
        self.lost = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no subclass)

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for: the connection is not usable
            self.close()
        else:
            self.response._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.response is not None:
            reason = f": {exc}" if exc else ""
            self.response._fail(ConnectionError(f"the engine closed the connection{reason}"))
        else:  # kept and idle (e.g. the engine's keep-alive ran out, or its replica is gone)
            self.pool.forget(self)

    @property
    def closed(self) -> bool:
        """Lost, closed by us, or closing: no request may be written on it."""
        return self.lost or self.transport is None or self.transport.is_closing()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.resume_reading()

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class EnginePool:
    """`POST`s to engine ports over kept-alive connections (see the module docstring)."""

    def __init__(self, *, timeout_s: float, connect_timeout_s: float = 5.0, idle_s: float = 60.0):
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.idle_s = idle_s
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._addresses: dict[str, tuple[str, int, bytes]] = {}
        self._closed = False

    async def post(
        self,
        url: str,
        path: str,
        headers: bytes,
        body: bytes,
        sent: Callable[[EngineResponse], None] | None = None,
    ) -> EngineResponse:
        """POST `body` to `url + path` with `headers` (`name: value\\r\\n` lines, ours to keep
        valid); the answer once its head is in. `sent` gets the answer-to-be as soon as the
        request is written (its `abort` then makes `post` raise `Stopped`). Raises
        `TimeoutError` when the port does not answer in time, `OSError` when it cannot be
        reached or drops the connection first."""
        host, port, authority = self._address(url)
        request = b"".join((
            b"POST ", path.encode("ascii"), b" HTTP/1.1\r\nhost: ", authority,
            b"\r\ncontent-length: ", str(len(body)).encode(), b"\r\n", headers, b"\r\n", body,
        ))  # fmt: skip
        kept = self._kept((host, port))
        if kept is not None:
            try:
                return await self._exchange(kept, request, sent)
            except Stopped:
                raise
            except ConnectionError:  # closed by the engine while idle: once more, on a new one
                pass
        connection = await self._connect(host, port)
        return await self._exchange(connection, request, sent)

    @property
    def idle(self) -> int:
        """Connections kept for the next requests."""
        return sum(len(connections) for connections in self._idle.values())

    def keep(self, connection: _Connection) -> None:
        """Keep an idle connection for the next request to its port (`EngineResponse`)."""
        if self._closed or connection.lost:
            connection.close()
            return
        connection.idle_since = connection.loop.time()
        self._idle.setdefault(connection.key, []).append(connection)

    def forget(self, connection: _Connection) -> None:
        """Drop a kept connection that closed while idle."""
        connections = self._idle.get(connection.key)
        if connections is not None and connection in connections:
            connections.remove(connection)
            if not connections:
                del self._idle[connection.key]

    async def close(self) -> None:
        """Close every idle connection (answers being read close theirs on release)."""
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    def _kept(self, key: tuple[str, int]) -> _Connection | None:
        connections = self._idle.get(key)
        while connections:
            connection = connections.pop()
            if connection.closed:
                continue
            if connection.loop.time() - connection.idle_since > self.idle_s:
                connection.close()
                continue
            return connection
        return None

    async def _connect(self, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        connecting = loop.create_connection(lambda: _Connection(self, (host, port)), host, port)
        _, connection = await asyncio.wait_for(connecting, self.connect_timeout_s)
        return connection

    async def _exchange(
        self,
        connection: _Connection,
        request: bytes,
        sent: Callable[[EngineResponse], None] | None,
    ) -> EngineResponse:
        if connection.closed:
            # The engine closed it between its connect and this write (e.g. its replica was
            # killed): uvloop raises on a closed transport, asyncio would wait for a head.
            raise ConnectionResetError("the engine closed the connection before the request")
        response = EngineResponse(connection, self.timeout_s)
        connection.response = response
        assert connection.transport is not None
        connection.transport.write(request)
        try:
            if sent is not None:
                sent(response)
            await response._head
        except BaseException:
            response.release()
            raise
        return response

    def _address(self, url: str) -> tuple[str, int, bytes]:
        address = self._addresses.get(url)
        if address is None:
            parts = urlsplit(url)
            if parts.scheme != "http" or parts.hostname is None or parts.port is None:
                raise ValueError(f"not an engine port's URL: {url!r}")
            address = (parts.hostname, parts.port, parts.netloc.encode("ascii"))
            self._addresses[url] = address
        return address
