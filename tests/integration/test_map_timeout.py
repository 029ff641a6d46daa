"""A router that never answers: `portfwd map` gives up at `--timeout`, says what it tried, in one line.

The "router" is a UDP socket on a loopback address of its own (127.77.0.1:5351) that reads every
request and answers none, and for UPnP a TCP listener that never accepts (the kernel completes
the handshake, nobody reads the request). Elapsed time is measured around the command, not slept.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.processes import REPO

pytestmark = [pytest.mark.integration]

ROUTER = "127.77.0.1"
#: What start-up and teardown of a `portfwd map` process may add to the timeout, at most.
SLACK = 2.0


class SilentRouter:
    """Reads NAT-PMP/PCP requests on ROUTER:5351 and never answers; counts what it read."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.socket.bind((ROUTER, 5351))
        except OSError as exc:
            self.socket.close()
            pytest.fail(f"cannot play the router on {ROUTER}:5351: {exc}")
        self.socket.settimeout(0.1)
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                self.requests.append(self.socket.recv(2048))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close()


@pytest.fixture
def router() -> Iterator[SilentRouter]:
    silent = SilentRouter()
    try:
        yield silent
    finally:
        silent.close()


@pytest.fixture
def deaf_http() -> Iterator[str]:
    """A description URL whose server takes the connection and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((ROUTER, 0))
        listener.listen(8)
        yield f"http://{ROUTER}:{listener.getsockname()[1]}/desc.xml"
    finally:
        listener.close()


def env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PORTFWD_STATE_DIR": str(tmp)}


def timed(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`portfwd ARGS` (stderr a pipe, so not a terminal) and how long it took."""
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "portfwd", *args],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=env(tmp),
    )  # fmt: skip
    return result, time.monotonic() - began


@pytest.mark.parametrize(
    ("command", "method", "label"),
    [
        (("map", "add", "8000/tcp"), "natpmp", "NAT-PMP"),
        (("map", "ip"), "pcp", "PCP"),
        (("map", "remove", "8000/udp"), "natpmp", "NAT-PMP"),
    ],
)
def test_a_silent_router_ends_at_the_timeout_in_one_line(
    router: SilentRouter, tmp_path: Path, command: tuple[str, ...], method: str, label: str
) -> None:
    """Not 128 s (NAT-PMP's RFC schedule) or 45 s (PCP's): 2 s, and nothing but the error."""
    result, elapsed = timed(tmp_path, *command, "--gateway", ROUTER, "--method", method, "--timeout", "2s")
    assert (result.returncode, result.stdout, result.stderr) == (
        1,
        "",
        f"portfwd: {label}: no answer from {ROUTER}:5351 in 2 s; give it longer with --timeout\n",
    )
    assert 2 <= elapsed < 2 + SLACK
    assert len(router.requests) >= (3 if method == "natpmp" else 1), "it retransmitted while it waited"


def test_auto_names_every_method_it_asked(router: SilentRouter, deaf_http: str, tmp_path: Path) -> None:
    """PCP (3 s) and NAT-PMP (0.75 s) go unanswered, then UPnP's server never replies: 5 s in all."""
    result, elapsed = timed(
        tmp_path, "map", "add", "8000", "--gateway", ROUTER, "--upnp-url", deaf_http, "--timeout", "5s"
    )
    assert (result.returncode, result.stderr) == (
        1,
        f"portfwd: no answer from the router at {ROUTER} in 5 s (asked by PCP, NAT-PMP and UPnP); "
        "give it longer with --timeout\n",
    )
    assert 5 <= elapsed < 5 + SLACK


def test_tries_can_end_it_before_the_timeout(router: SilentRouter, tmp_path: Path) -> None:
    """--tries 2 (250 + 500 ms) is reached first; the line says how long it waited."""
    result, elapsed = timed(tmp_path, "map", "ip", "--gateway", ROUTER, "--method", "natpmp", "--tries", "2")
    assert result.returncode == 1
    assert re.fullmatch(rf"portfwd: NAT-PMP: no answer from {ROUTER}:5351 in 0\.[89] s\n", result.stderr), (
        result.stderr
    )
    assert 0.75 <= elapsed < 0.75 + SLACK
    assert len(router.requests) == 2


NOTICE = f"portfwd: asking {ROUTER} by NAT-PMP (no answer yet; giving up in 2 s)"
GAVE_UP = f"portfwd: NAT-PMP: no answer from {ROUTER}:5351 in 3 s; give it longer with --timeout"


def test_with_v_it_says_what_it_is_waiting_for(router: SilentRouter, tmp_path: Path) -> None:
    result, elapsed = timed(
        tmp_path, "map", "ip", "--gateway", ROUTER, "--method", "natpmp", "--timeout", "3s", "-v"
    )
    assert (result.returncode, result.stderr.splitlines()) == (1, [NOTICE, GAVE_UP])
    assert 3 <= elapsed < 3 + SLACK


def test_on_a_terminal_it_says_what_it_is_waiting_for(router: SilentRouter, tmp_path: Path) -> None:
    """stderr is a pseudo-terminal, as when a person runs it; -q silences the line again."""
    for quiet, expected in (((), [NOTICE, GAVE_UP]), (("-q",), [GAVE_UP])):
        primary, secondary = os.openpty()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "portfwd", "map", "ip", "--gateway", ROUTER, "--method", "natpmp",
                 "--timeout", "3s", *quiet],
                stdout=subprocess.DEVNULL, stderr=secondary, stdin=subprocess.DEVNULL, cwd=REPO,
                env=env(tmp_path),
            )  # fmt: skip
            os.close(secondary)
            secondary = -1
            out = b""
            deadline = time.monotonic() + 3 + SLACK + 5
            while time.monotonic() < deadline:  # bounded: until EOF (EIO on Linux) or the deadline
                ready, _, _ = select.select([primary], [], [], deadline - time.monotonic())
                if not ready:
                    break
                try:
                    chunk = os.read(primary, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            assert proc.wait(10) == 1
        finally:
            os.close(primary)
            if secondary >= 0:
                os.close(secondary)
        assert out.decode().replace("\r\n", "\n").splitlines() == expected


def test_map_list_gives_up_on_upnp_and_shows_what_portfwd_holds(deaf_http: str, tmp_path: Path) -> None:
    """PCP and NAT-PMP cannot list; portfwd's own record of a grant is listed with its lease left.

    The record is written as `map add` writes it (router/ledger.py): method, router, protocol,
    this host and port, the public address and port, and when the lease ends.
    """
    ends = round(time.time()) + 600
    (tmp_path / "mappings").write_text(
        f"natpmp {ROUTER} tcp 127.0.0.1 8000 198.51.100.7 18000 {ends}\n"
        f"pcp 192.0.2.1 tcp 127.0.0.1 8001 198.51.100.7 18001 {ends}\n"  # another router's
        f"pcp {ROUTER} udp 127.0.0.1 8002 198.51.100.7 18002 {ends - 700}\n"  # lease over
    )
    result, elapsed = timed(
        tmp_path, "map", "list", "--gateway", ROUTER, "--upnp-url", deaf_http, "--timeout", "1s", "--json"
    )
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert {key: row[key] for key in ("protocol", "external_port", "internal_port", "method", "ours")} == {
        "protocol": "tcp", "external_port": 18000, "internal_port": 8000, "method": "natpmp", "ours": True,
    }  # fmt: skip
    assert 590 <= row["lease"] <= 600
    (warning,) = result.stderr.splitlines()
    assert warning.endswith(
        f" WARNING UPnP: no answer from {deaf_http} in 1 s; give it longer with --timeout; "
        "listing only the mappings portfwd made by PCP or NAT-PMP"
    ), warning
    assert 1 <= elapsed < 1 + SLACK
