"""A running `portfwd run` with [web] for the web tests, and a plain HTTP client for its API."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import need_binary
from tests.integration.peers import free_port
from tests.integration.processes import Proc, portfwd_argv, wait_listening

TOKEN = "7f3c1d2e9a8b4c6d5e0f1a2b3c4d5e6f"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebInstance:
    """A portfwd with [web] at `port`, its config file, and the echo server behind its rules."""

    proc: Proc
    port: int
    config: Path
    echo: int
    rules: dict[str, int] = field(default_factory=dict)  # rule name -> listen port

    def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = 10.0,
    ) -> Answer:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            data = response.read()
            return Answer(response.status, {key.lower(): value for key, value in response.getheaders()}, data)
        finally:
            connection.close()

    def status(self) -> dict[str, Any]:
        answer = self.call("GET", "/api/v1/status", token=TOKEN)
        assert answer.status == 200, answer
        return dict(answer.json)

    def rule(self, name: str) -> dict[str, Any]:
        (row,) = [rule for rule in self.status()["rules"] if rule["name"] == name]
        return dict(row)

    def wait(self, predicate: Any, what: str, seconds: float = 10.0) -> dict[str, Any]:
        """Poll the status (bounded) until `predicate(status)` holds; returns that status."""
        deadline = time.monotonic() + seconds
        while True:
            status = self.status()
            if predicate(status):
                return status
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {json.dumps(status)[:2000]}"
            time.sleep(0.05)


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """socat echoing every TCP connection and every UDP datagram, on one loopback port number;
    stopped by PID."""
    socat = need_binary("socat", "socat")
    port = free_port()
    processes = [
        subprocess.Popen(
            [socat, f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", "EXEC:cat"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [socat, f"UDP4-RECVFROM:{port},bind=127.0.0.1,fork", "EXEC:cat"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        wait_listening(port)
        yield port
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(10)


def config_text(port: int, echo: int, rules: dict[str, int], extra: str = "", web: str = "") -> str:
    parts = ["workers = 2", 'drain_timeout = "1s"']
    dead = free_port()
    for name, listen in rules.items():
        if name == "dgram":
            parts.append(
                f'[[forward]]\nname = "dgram"\nlisten = "127.0.0.1:{listen}"\nconnect = "127.0.0.1:{echo}"\n'
                'protocol = "udp"\n'
            )
        elif name == "pool":
            parts.append(
                f'[[forward]]\nname = "pool"\nlisten = "127.0.0.1:{listen}"\n'
                f'connect = ["127.0.0.1:{echo}", "127.0.0.1:{dead}"]\nbalance = "first"\n'
            )
        else:
            parts.append(
                f'[[forward]]\nname = "{name}"\nlisten = "127.0.0.1:{listen}"\nconnect = "127.0.0.1:{echo}"\n'
            )
    parts.append(extra)
    parts.append(web or f'[web]\nlisten = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\n')
    return "\n".join(parts)


@contextlib.contextmanager
def web_instance(
    tmp_path: Path, *, rules: tuple[str, ...] = ("echo", "pool", "dgram"), extra: str = "", web: str = ""
) -> Iterator[WebInstance]:
    """`portfwd run` with [web] (and the given rules to a socat echo), stopped by PID."""
    with echo_server() as echo:
        port = free_port()
        listen = {
            name: free_port(socket.SOCK_DGRAM if name == "dgram" else socket.SOCK_STREAM) for name in rules
        }
        path = tmp_path / "portfwd.toml"
        path.write_text(
            config_text(port, echo, listen, extra.replace("PORT", str(port)), web.replace("PORT", str(port)))
        )
        proc = Proc(portfwd_argv("run", "-c", str(path)), env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            proc.wait_for(" ready: ", timeout=30)
            wait_listening(port)
            yield WebInstance(proc, port, path, echo, listen)
        finally:
            proc.stop()
            proc.close()


def echo_flood(port: int, count: int) -> list[socket.socket]:
    """`count` echo clients at once, a thread each released together: a flood, which the
    processes sharing a rule's accept queue take between them."""
    start = threading.Barrier(count)

    def one(_: int) -> socket.socket:
        start.wait(timeout=10)
        return echo_client(port)

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def echo_client(port: int, payload: bytes = b"ping", timeout: float = 5.0) -> socket.socket:
    """A connected client that has had one echo back (so it is a live session)."""
    client = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    client.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = client.recv(65536)
        assert chunk, "the echo ended early"
        got += chunk
    assert got == payload
    return client
