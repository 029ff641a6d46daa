"""The C engine (relay/_native.c) against real sockets: which rules take it, and that what a
session shows (bytes, reasons, status rows, the recently closed, drain, an operator's close,
shutdown, connect failures and time-outs) is what the Python splice path shows.

The byte-level conformance suite (8 MiB each way, half-closes, backpressure, 100 clients) runs
against it in test_relay_conformance.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from portfwd.relay import native
from portfwd.relay.forwarder import TcpForwarder
from portfwd.relay.nativeforward import NativeForwarder
from tests.integration.peers import MiB, free_port, open_client, peer, read_all, running, sha, wait_until
from tests.integration.processes import portfwd_argv, started

pytestmark = pytest.mark.integration


def _need_engine() -> None:
    if not native.available():
        if os.environ.get("CI") == "true":
            pytest.fail(
                "the C engine (portfwd.relay._native) was not built: .ci/run installs gcc and python3-dev"
            )
        pytest.skip("the C engine (portfwd.relay._native) was not built here (no C compiler?)")


@pytest.fixture(autouse=True)
def engine() -> None:
    _need_engine()


@contextlib.contextmanager
def python_path() -> Iterator[None]:
    """PORTFWD_NATIVE=0 for the body: rules started meanwhile keep to the Python relays."""
    before = os.environ.get("PORTFWD_NATIVE")
    os.environ["PORTFWD_NATIVE"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["PORTFWD_NATIVE"]
        else:
            os.environ["PORTFWD_NATIVE"] = before


def rule_for(port: int, target: int, **extra: object) -> dict[str, object]:
    return {"listen": f"127.0.0.1:{port}", "connect": f"127.0.0.1:{target}", "relay": "splice", **extra}


async def test_a_plain_rule_is_relayed_by_the_engine_with_its_sessions_recorded() -> None:
    port = free_port()
    down = os.urandom(3 * MiB)
    async with peer("exchange", ("127.0.0.1", 0), down) as upstream:
        assert not isinstance(upstream.address, str)
        async with running({"forward": [rule_for(port, upstream.address[1])]}) as runtime:
            kinds = {type(forwarder) for forwarder in runtime.tcp_forwarders}
            assert kinds == {NativeForwarder}
            up = os.urandom(2 * MiB + 17)
            reader, writer = await open_client(("127.0.0.1", port))
            writer.write(up[:MiB])
            await writer.drain()
            # Live: the row shows the bytes the engine moved so far (copied in when read).
            await wait_until(
                lambda: any(row.bytes_up >= MiB for row in runtime.state.session_rows()), 5, "live bytes"
            )
            (row,) = runtime.state.session_rows()
            assert (row.path, row.target) == ("splice", f"127.0.0.1:{upstream.address[1]}")
            assert row.upstream_local.startswith("127.0.0.1:")
            writer.write(up[MiB:])
            writer.write_eof()
            assert sha(await read_all(reader)) == sha(down)
            writer.close()
            await wait_until(lambda: not runtime.state.sessions, 5, "session closed")
            await wait_until(lambda: bool(upstream.received), 5, "the upstream read to the end")
            assert upstream.received == [sha(up)]
            (closed,) = runtime.state.closed_rows()
            assert (closed.bytes_up, closed.bytes_down) == (len(up), len(down))
            assert closed.reason in ("client closed", "upstream closed")
            (stats,) = runtime.state.rules.values()
            assert (stats.connections_total, stats.connections_active) == (1, 0)
            assert (stats.bytes_up, stats.bytes_down) == (len(up), len(down))
            assert sum(stats.connect_buckets) == 1


async def test_which_rules_keep_to_python() -> None:
    port, other = free_port(), free_port()
    rules = [
        rule_for(port, 9, route=[{"source": ["127.0.0.2/32"], "connect": "127.0.0.1:10"}]),
        rule_for(other, 9, max_connections=5),
        rule_for(free_port(), 9, accept_proxy_protocol=True, trusted_proxies=["127.0.0.1/32"]),
    ]
    async with running({"forward": rules}) as runtime:
        assert {type(forwarder) for forwarder in runtime.tcp_forwarders} == {TcpForwarder}
    with python_path():
        async with running({"forward": [rule_for(free_port(), 9)]}) as runtime:
            assert {type(forwarder) for forwarder in runtime.tcp_forwarders} == {TcpForwarder}


async def test_a_refused_connect_is_counted_logged_and_kept(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    closed_port = free_port()  # nothing listens there
    async with running({"forward": [rule_for(port, closed_port)]}) as runtime:
        reader, writer = await open_client(("127.0.0.1", port))
        with contextlib.suppress(ConnectionError):
            assert await read_all(reader) == b""
        writer.close()
        (stats,) = runtime.state.rules.values()
        await wait_until(lambda: stats.errors.get("refused") == 1, 5, "counted")
        (closed,) = runtime.state.closed_rows()
        assert closed.reason == "upstream: connection refused"
        assert stats.connections_total == 0
    assert f"-> 127.0.0.1:{closed_port} failed: connection refused; client closed" in caplog.text


async def test_a_connect_that_gets_no_answer_times_out() -> None:
    """A target whose accept queue is full drops the SYN: no answer, within connect_timeout."""
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(0)  # one connection fills it
    filler = socket.create_connection(target.getsockname())
    port = free_port()
    try:
        rule = rule_for(port, target.getsockname()[1], connect_timeout="0.5s")
        async with running({"forward": [rule]}) as runtime:
            loop = asyncio.get_running_loop()
            began = loop.time()
            reader, writer = await open_client(("127.0.0.1", port))
            with contextlib.suppress(ConnectionError):
                assert await read_all(reader) == b""
            writer.close()
            assert 0.4 < loop.time() - began < 3
            (stats,) = runtime.state.rules.values()
            assert stats.errors == {"timeout": 1}
            (closed,) = runtime.state.closed_rows()
            assert closed.reason == "upstream: no answer within 0.5s"
    finally:
        filler.close()
        target.close()


async def test_drain_operator_close_and_shutdown_end_sessions_with_their_reasons(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    async with peer("echo", ("127.0.0.1", 0)) as upstream:
        assert not isinstance(upstream.address, str)
        async with running({"forward": [rule_for(port, upstream.address[1], name="web")]}) as runtime:
            first_reader, first = await open_client(("127.0.0.1", port))
            second_reader, second = await open_client(("127.0.0.1", port))
            for writer, reader in ((first, first_reader), (second, second_reader)):
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
            await wait_until(lambda: len(runtime.state.sessions) == 2, 5, "two sessions")
            runtime._rules.set_mode("web", "draining")

            async def refused() -> bytes:
                reader, _ = await open_client(("127.0.0.1", port))
                return await reader.read()

            with pytest.raises(ConnectionResetError):  # at the connect, or at the first read
                await refused()
            (stats,) = runtime.state.rules.values()
            assert stats.errors == {"draining": 1}
            first.write(b"still")  # a draining rule's live sessions go on
            assert await first_reader.readexactly(5) == b"still"
            ident = min(runtime.state.sessions)
            assert runtime.state.end(ident, "closed by the operator")
            assert await first_reader.read() == b""
            first.close()
            assert [row.reason for row in runtime.state.closed_rows()] == ["closed by the operator"]
        assert await second_reader.read() == b""  # shutdown closed it
        second.close()
    assert "closed (closed by the operator)" in caplog.text
    assert "closed (shutdown)" in caplog.text


async def test_a_hundred_short_sessions_each_log_open_and_closed(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    async with peer("echo", ("127.0.0.1", 0)) as upstream:
        assert not isinstance(upstream.address, str)
        async with running({"forward": [rule_for(port, upstream.address[1])]}) as runtime:

            async def one(index: int) -> bytes:
                reader, writer = await open_client(("127.0.0.1", port))
                writer.write(b"%d" % index)
                writer.write_eof()
                data = await read_all(reader)
                writer.close()
                return data

            assert await asyncio.gather(*(one(i) for i in range(100))) == [b"%d" % i for i in range(100)]
            await wait_until(lambda: not runtime.state.sessions, 5, "all closed")
            (stats,) = runtime.state.rules.values()
            assert stats.connections_total == 100
    assert caplog.text.count(" open (splice)") == 100
    assert caplog.text.count(" closed (") == 100


async def connect_from(source: str, port: int) -> bytes:
    """Connect from loopback address `source` and read to the end (b"" when turned away)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await loop.sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"hello")
    writer.write_eof()
    try:
        return await read_all(reader)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_allow_and_deny_are_the_engine_s(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    async with peer("echo", ("127.0.0.1", 0)) as upstream:
        assert not isinstance(upstream.address, str)
        rule = rule_for(port, upstream.address[1], allow=["127.0.0.0/29"], deny=["127.0.0.2/32"])
        async with running({"forward": [rule]}) as runtime:
            assert {type(forwarder) for forwarder in runtime.tcp_forwarders} == {NativeForwarder}
            assert await connect_from("127.0.0.1", port) == b"hello"
            assert await connect_from("127.0.0.2", port) == b""  # denied
            assert await connect_from("127.0.0.9", port) == b""  # not allowed
            assert await connect_from("127.0.0.7", port) == b"hello"
            (stats,) = runtime.state.rules.values()
            await wait_until(lambda: stats.denied_total == 2, 5, "two denied")
            assert stats.connections_total == 2
            assert len(upstream.clients) == 2
    assert "127.0.0.2:" in caplog.text
    assert caplog.text.count("denied by allow/deny; closed") == 2


def _session_lines(log_format: str, native_on: bool, tmp_path: Path) -> list[str]:
    """The open and closed lines of three sessions through `portfwd run` (a subprocess, its
    only log handler the front end's: the engine writes them when `native_on`)."""
    port = free_port()
    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen(8)
    config = tmp_path / f"lines-{log_format}-{native_on}.toml"
    config.write_text(
        f'workers = 1\n[[forward]]\nname = "wéb"\nlisten = "127.0.0.1:{port}"\n'
        f'connect = "127.0.0.1:{echo.getsockname()[1]}"\nrelay = "splice"\n[control]\nenabled = false\n'
    )
    env = {**os.environ, "PORTFWD_NATIVE": "1" if native_on else "0"}
    argv = portfwd_argv("run", "-c", str(config), "--log-format", log_format)
    try:
        with started(argv, " ready: ", env=env) as proc:  # no probe: it would be a session
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                    served, _ = echo.accept()
                    with served:
                        client.sendall(b"abc")
                        assert served.recv(3) == b"abc"
                        served.sendall(b"12345")
                        assert client.recv(5) == b"12345"
                        served.shutdown(socket.SHUT_WR)
                        assert client.recv(1) == b""
                proc.wait_for("closed (", timeout=10, start=proc.mark())
            proc.stop()
            return [line for line in proc.output().splitlines() if " open (" in line or " closed (" in line]
    finally:
        echo.close()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_engine_writes_the_lines_python_would(log_format: str, tmp_path: Path) -> None:
    """Same text, fields and order as the Python path's lines (times and addresses aside); a rule name that is not ASCII is written as it is in text, escaped in JSON."""
    lines = {on: _session_lines(log_format, on, tmp_path) for on in (True, False)}
    assert len(lines[True]) == len(lines[False]) == 6

    def shape(line: str) -> object:
        if log_format == "json":
            record = json.loads(line)
            assert isinstance(record["ts"], float)
            record["ts"] = 0.0
            for key in ("client", "target", "msg"):
                record[key] = re.sub(r"127\.0\.0\.1:\d+", "A", record[key])
            if "duration_s" in record:
                assert isinstance(record["duration_s"], float)
                record["duration_s"] = 0.0
                record["msg"] = re.sub(r"[\d.]+s$", "Ds", record["msg"])
            return list(record.items())
        line = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", "", line)
        line = re.sub(r"127\.0\.0\.1:\d+", "A", line)
        return re.sub(r", \d+\.\d{3}s$", ", Ds", line)

    assert [shape(line) for line in lines[True]] == [shape(line) for line in lines[False]]
    if log_format == "text":
        assert lines[True][0].split(" INFO ", 1)[1].startswith("wéb: 127.0.0.1:")
        assert lines[True][1].endswith((": 3 B up, 5 B down, 0.000s", "s"))
        assert " closed (upstream closed): 3 B up, 5 B down, " in lines[True][1]
    else:
        assert json.loads(lines[True][0])["rule"] == "wéb"
        assert '"rule": "w\\u00e9b"' in lines[True][0]


async def test_backends_are_balanced_and_failed_over_by_the_engine(caplog: pytest.LogCaptureFixture) -> None:
    """Round-robin picked in C while the pool is healthy; a refused backend makes the pool
    pick the next (the client sees no error); with every backend refused, one failed line."""
    port = free_port()
    dead = free_port()  # nothing listens there
    async with peer("echo", ("127.0.0.1", 0)) as first, peer("echo", ("127.0.0.1", 0)) as second:
        assert not isinstance(first.address, str)
        assert not isinstance(second.address, str)
        rule = {
            "listen": f"127.0.0.1:{port}",
            "relay": "splice",
            "balance": "round-robin",
            "backend": [
                {"name": "a", "connect": f"127.0.0.1:{first.address[1]}"},
                {"name": "b", "connect": f"127.0.0.1:{second.address[1]}"},
                {"name": "c", "connect": f"127.0.0.1:{dead}"},
            ],
        }
        async with running({"forward": [rule]}) as runtime:
            assert {type(forwarder) for forwarder in runtime.tcp_forwarders} == {NativeForwarder}

            async def one(text: bytes) -> bytes:
                reader, writer = await open_client(("127.0.0.1", port))
                writer.write(text)
                writer.write_eof()
                data = await read_all(reader)
                writer.close()
                return data

            for index in range(9):  # one in three picks "c", refused: failed over at once
                assert await one(b"%d" % index) == b"%d" % index
            await wait_until(lambda: not runtime.state.sessions, 5, "all closed")
            (stats,) = runtime.state.rules.values()
            assert stats.connections_total == 9
            assert stats.errors == {}
            by_name = {backend.name: backend for backend in stats.backends}
            assert by_name["c"].failures >= 1
            assert by_name["a"].total + by_name["b"].total == 9
            assert abs(by_name["a"].total - by_name["b"].total) <= 3
            assert [backend.active for backend in stats.backends] == [0, 0, 0]
    assert "failed:" not in caplog.text


async def test_every_backend_refused_is_one_failed_line(caplog: pytest.LogCaptureFixture) -> None:
    port, one, two = free_port(), free_port(), free_port()
    rule = {
        "listen": f"127.0.0.1:{port}",
        "relay": "splice",
        "backend": [{"connect": f"127.0.0.1:{one}"}, {"connect": f"127.0.0.1:{two}"}],
    }
    async with running({"forward": [rule]}) as runtime:
        reader, writer = await open_client(("127.0.0.1", port))
        with contextlib.suppress(ConnectionError):
            assert await read_all(reader) == b""
        writer.close()
        (stats,) = runtime.state.rules.values()
        await wait_until(lambda: stats.errors.get("refused") == 1, 5, "counted once")
        assert [backend.failures for backend in stats.backends] == [1, 1]
        assert [backend.active for backend in stats.backends] == [0, 0]
    assert caplog.text.count("failed: connection refused; client closed") == 1


@pytest.mark.parametrize("version", [1, 2])
async def test_the_proxy_header_the_engine_sends(version: int) -> None:
    """Byte for byte what proto/proxy.py makes for the same client, then the client's bytes."""
    from portfwd.proto.proxy import header

    port = free_port()
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(4)
    target.setblocking(False)
    loop = asyncio.get_running_loop()
    rule = rule_for(port, target.getsockname()[1], proxy_protocol=f"v{version}")
    try:
        async with running({"forward": [rule]}):
            _, writer = await open_client(("127.0.0.1", port))
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            await writer.drain()
            client = writer.get_extra_info("sockname")
            served, _ = await loop.sock_accept(target)
            with served:
                expected = (
                    header(version, (client[0], client[1]), ("127.0.0.1", port)) + b"GET / HTTP/1.0\r\n\r\n"
                )
                got = b""
                async with asyncio.timeout(5):
                    while len(got) < len(expected):
                        chunk = await loop.sock_recv(served, 4096)
                        assert chunk, got
                        got += chunk
                assert got == expected
            writer.close()
    finally:
        target.close()


async def test_small_writes_are_copied_and_what_the_upstream_cannot_take_yet_waits() -> None:
    """Each direction starts by copying (recv, send) and splices once a read fills its copy
    buffer (_native.c, COPY_BYTES). Small writes against an upstream that reads nothing fill
    the path; what a copy could not send waits in a pipe and goes out, in order, once the
    upstream reads."""
    port = free_port()
    go = asyncio.Event()
    received: list[bytes] = []

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await go.wait()
        received.append(await read_all(reader))
        writer.write(b"done")
        writer.close()

    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited: fills early
    listening.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(slow, sock=listening)
    target = listening.getsockname()[1]
    async with server, running({"forward": [rule_for(port, target)]}) as runtime:
        reader, writer = await open_client(("127.0.0.1", port))
        sent = bytearray()
        chunk = 0
        # Bounded: 1000-byte writes until the client's own socket is full (the relay's
        # destination, the upstream, took what it could), at most 64 MiB.
        while writer.transport.get_write_buffer_size() == 0 and len(sent) < 64 * MiB:
            data = chunk.to_bytes(4, "big") * 250
            writer.write(data)
            sent += data
            chunk += 1
            await asyncio.sleep(0)  # the engine (this loop's reader) copies what arrived
        assert writer.transport.get_write_buffer_size() > 0, "the path never filled"
        go.set()
        writer.write_eof()
        assert await reader.read() == b"done"
        writer.close()
        assert sha(received[0]) == sha(bytes(sent))
        await wait_until(lambda: not runtime.state.sessions, 5, "session closed")
        (closed,) = runtime.state.closed_rows()
        assert closed.bytes_up == len(sent)
