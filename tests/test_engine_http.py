"""The relay's HTTP/1.1 client (`app.ingress.engine_http`) against real loopback servers that
send chosen bytes: kept-alive connections, a kept connection closed by the engine, time-outs
before and after the head, broken and chunked bodies, back-pressure, and the `Relay` errors
built on them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from app.ingress.engine_http import PAUSE_BYTES, EnginePool
from app.ingress.relay import Relay, RelayError

pytestmark = pytest.mark.anyio
Handler = Callable[[int, int, bytes, asyncio.StreamWriter], Awaitable[bool]]


@pytest.fixture(params=[False, True], ids=["asyncio", "uvloop"])
def anyio_backend(request):
    """Both event loops: Ray Serve's replicas run uvloop, whose transports differ."""
    return "asyncio", {"use_uvloop": request.param}


class Server:
    """A loopback server reading each request and answering it with `handler(connection
    number, request number on it, request bytes, writer)`; False from it closes the
    connection. Keeps every request's bytes and counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed_by_client = 0
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number, seen = self.connections, 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client += 1
                    return
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                seen += 1
                if not await self.handler(number, seen, request, writer):
                    return
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> Server:
        server = Server(handler)
        listening = await asyncio.start_server(server._serve, "127.0.0.1", 0)
        servers.append(listening)
        server.url = f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"
        return server

    yield start
    for listening in servers:
        listening.close()


def _json(body: bytes, *, close: bool = False) -> bytes:
    connection = b"connection: close\r\n" if close else b""
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json; charset=utf-8\r\n"
        + connection
        + b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )


async def _answer(body: bytes, writer: asyncio.StreamWriter, *, close: bool = False) -> bool:
    writer.write(_json(body, close=close))
    await writer.drain()
    return not close


async def _soon(check: Callable[[], bool], timeout_s: float = 1.0) -> None:
    """Until `check()` holds or `timeout_s` has passed (the caller asserts it)."""
    for _ in range(int(timeout_s / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)


async def _post(pool: EnginePool, server: Server, body: bytes = b'{"n":1}') -> bytes:
    response = await pool.post(server.url, "/v1/completions", b"x-test: yes\r\n", body)
    try:
        return await response.read()
    finally:
        response.release()


async def test_requests_to_one_port_share_a_kept_connection(serve):
    async def echo(conn: int, seen: int, request: bytes, writer) -> bool:
        return await _answer(b"%d.%d" % (conn, seen), writer)

    server = await serve(echo)
    pool = EnginePool(timeout_s=5)
    try:
        assert [await _post(pool, server) for _ in range(3)] == [b"1.1", b"1.2", b"1.3"]
    finally:
        await pool.close()
    assert server.connections == 1
    head, body = server.requests[0].split(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"\r\ncontent-length: 7\r\n" in head and b"\r\nx-test: yes" in head
    assert body == b'{"n":1}'


async def test_concurrent_requests_each_get_a_connection_and_their_own_answer(serve):
    async def slow_echo(conn: int, seen: int, request: bytes, writer) -> bool:
        await asyncio.sleep(0.05)
        return await _answer(request.split(b"\r\n\r\n")[1], writer)

    server = await serve(slow_echo)
    pool = EnginePool(timeout_s=5)
    try:
        bodies = [b'{"i":%d}' % i for i in range(5)]
        answers = await asyncio.gather(*(_post(pool, server, body) for body in bodies))
        assert answers == bodies
        assert server.connections == 5
        await _post(pool, server)  # then kept: no sixth
        assert server.connections == 5
    finally:
        await pool.close()


async def test_a_kept_connection_the_engine_dropped_is_replaced_without_failing(serve):
    """The engine closes a kept connection as the next request arrives on it (its keep-alive
    ran out): the request goes again on a new connection."""

    async def drops_second(conn: int, seen: int, request: bytes, writer) -> bool:
        if conn == 1 and seen == 2:
            return False  # closed without an answer
        return await _answer(b"ok%d" % conn, writer)

    server = await serve(drops_second)
    pool = EnginePool(timeout_s=5)
    try:
        assert await _post(pool, server) == b"ok1"
        assert await _post(pool, server) == b"ok2"
    finally:
        await pool.close()
    assert server.connections == 2


async def test_a_kept_connection_the_engine_closes_while_idle_is_let_go(serve):
    async def answer_then_close(conn: int, seen: int, request: bytes, writer) -> bool:
        await _answer(b"ok", writer)
        await asyncio.sleep(0.1)  # the client has kept the connection by now
        return False

    server = await serve(answer_then_close)
    pool = EnginePool(timeout_s=5)
    try:
        assert await _post(pool, server) == b"ok"
        assert pool.idle == 1
        await _soon(lambda: pool.idle == 0)
        assert pool.idle == 0  # not held until the port is used again
        assert await _post(pool, server) == b"ok"
    finally:
        await pool.close()
    assert server.connections == 2


async def test_an_answer_asking_to_close_and_an_unfinished_read_are_not_kept(serve):
    async def closing_then_long(conn: int, seen: int, request: bytes, writer) -> bool:
        if conn == 1:
            return await _answer(b"bye", writer, close=True)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()
        return True  # back to reading: the client's close is seen there

    server = await serve(closing_then_long)
    pool = EnginePool(timeout_s=5)
    try:
        assert await _post(pool, server) == b"bye"
        assert pool.idle == 0
        response = await pool.post(server.url, "/x", b"", b"{}")
        assert [await anext(response.chunks())] == [b"partial"]
        response.release()  # left before the end: the connection is closed
        await _soon(lambda: server.closed_by_client > 0)
        assert server.closed_by_client == 1
        assert server.connections == 2
    finally:
        await pool.close()


async def test_a_port_that_does_not_answer_in_time_is_a_timeout(serve):
    async def silent(conn: int, seen: int, request: bytes, writer) -> bool:
        await asyncio.sleep(5)
        return False

    server = await serve(silent)
    relay = Relay("token", timeout_s=0.3)
    try:
        with pytest.raises(RelayError) as caught:
            await relay.send(server.url, "/v1/completions", b"{}", "req-1")
        assert caught.value.timed_out
    finally:
        await relay.close()
    assert b"\r\nx-request-id: req-1\r\n" in server.requests[0]


async def test_a_refused_port_is_a_relay_error_that_is_not_a_timeout():
    relay = Relay("token", timeout_s=5)
    try:
        with pytest.raises(RelayError) as caught:
            await relay.send("http://127.0.0.1:9", "/v1/completions", b"{}", "req-1")
        assert not caught.value.timed_out
    finally:
        await relay.close()


class _LateConnect(EnginePool):
    """A pool whose new connections are handed over only once the engine has closed them, as
    when its replica is killed between the connect and the request's write."""

    async def _connect(self, host: str, port: int):
        connection = await super()._connect(host, port)
        await _soon(lambda: connection.lost)
        return connection


async def test_a_connection_closed_before_the_request_is_written_is_a_connection_error():
    """Not uvloop's RuntimeError for a write on a closed transport, nor asyncio's wait for a
    head that never comes: the relay tries another replica at once (`Relay` makes it a
    `RelayError`)."""

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    listening = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    pool = _LateConnect(timeout_s=5)
    try:
        with pytest.raises(ConnectionError):
            await pool.post(url, "/v1/completions", b"", b"{}")
    finally:
        await pool.close()
        listening.close()


async def _stream_then(end: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> Handler:
    async def handler(conn: int, seen: int, request: bytes, writer) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n7\r\ndata: a\r\n"
        )
        await writer.drain()
        await end(writer)
        return False

    return handler


async def _read_all(pool: EnginePool, url: str) -> tuple[list[bytes], BaseException | None]:
    response = await pool.post(url, "/stream", b"", b"{}")
    assert response.content_type == "text/event-stream"
    got: list[bytes] = []
    try:
        async for piece in response.chunks():
            got.append(piece)
    except OSError as exc:
        return got, exc
    finally:
        response.release()
    return got, None


async def test_a_chunked_stream_is_decoded_and_ends_with_its_last_chunk(serve):
    async def finish(writer) -> None:
        await asyncio.sleep(0.05)
        writer.write(b"9\r\ndata: b\n\n\r\n0\r\n\r\n")
        await writer.drain()

    server = await serve(await _stream_then(finish))
    pool = EnginePool(timeout_s=5)
    try:
        got, error = await _read_all(pool, server.url)
    finally:
        await pool.close()
    assert error is None and b"".join(got) == b"data: adata: b\n\n" and len(got) == 2


async def test_a_stream_that_stalls_gives_its_bytes_then_a_timeout(serve):
    async def stall(writer) -> None:
        await asyncio.sleep(5)

    server = await serve(await _stream_then(stall))
    pool = EnginePool(timeout_s=0.3)
    try:
        got, error = await _read_all(pool, server.url)
    finally:
        await pool.close()
    assert got == [b"data: a"] and isinstance(error, TimeoutError)


@pytest.mark.parametrize("ending", [b"", b"zz\r\nnot a chunk"])
async def test_a_stream_that_breaks_gives_its_bytes_then_a_connection_error(serve, ending):
    async def break_off(writer) -> None:
        writer.write(ending)
        await writer.drain()

    server = await serve(await _stream_then(break_off))
    pool = EnginePool(timeout_s=5)
    try:
        got, error = await _read_all(pool, server.url)
    finally:
        await pool.close()
    assert got == [b"data: a"] and isinstance(error, ConnectionError)


async def test_a_body_larger_than_the_pause_mark_arrives_whole(serve):
    big = bytes(range(256)) * (3 * PAUSE_BYTES // 256)

    async def send_big(conn: int, seen: int, request: bytes, writer) -> bool:
        return await _answer(big, writer)

    server = await serve(send_big)
    pool = EnginePool(timeout_s=5)
    try:
        response = await pool.post(server.url, "/big", b"", b"{}")
        got = []
        async for piece in response.chunks():
            got.append(piece)
            await asyncio.sleep(0.01)  # a slow reader: the engine's bytes wait in the socket
        response.release()
        assert b"".join(got) == big
        # Reading paused once the mark was passed (by at most one read of the socket's).
        assert max(len(piece) for piece in got) <= 2 * PAUSE_BYTES
        assert await _post(pool, server) == big  # and the connection is kept
        assert server.connections == 1
    finally:
        await pool.close()


async def test_a_header_value_with_a_line_break_is_refused():
    relay = Relay("token", timeout_s=1)
    with pytest.raises(ValueError, match="line break"):
        await relay.send("http://127.0.0.1:9", "/x", b"{}", "id\r\nx-evil: 1")
