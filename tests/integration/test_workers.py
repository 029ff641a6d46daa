"""`workers = N`: the rules relayed by several processes that are one instance.

portfwd runs as users run it (`portfwd run -c`), with `workers = 2`. The target is a sink that
holds each connection until the client half-closes and answers with the sha256 of what came,
so live sessions can be counted and every byte checked. Which process relays a session is its
`pid` in `status --json`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.peers import free_port
from tests.integration.processes import READY, Proc, portfwd_argv, run_portfwd, started
from tests.integration.test_status import Sink

pytestmark = pytest.mark.integration


def _status(control: Path) -> dict[str, Any]:
    result = run_portfwd("status", "--json", "--control", str(control))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _hold(port: int, count: int) -> list[tuple[socket.socket, bytes]]:
    held = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        data = os.urandom(500)
        client.sendall(data)
        held.append((client, data))
    return held


def _flood(port: int, count: int) -> list[tuple[socket.socket, bytes]]:
    """`count` clients at once, a thread each released together: a flood, which the processes
    sharing the rule's accept queue take between them (one alone may take a trickle)."""
    start = threading.Barrier(count)

    def one() -> tuple[socket.socket, bytes]:
        start.wait(timeout=10)
        return _hold(port, 1)[0]

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: one(), range(count)))


def _spread(
    port: int, control: Path, count: int, pids: set[int], waves: int = 3
) -> tuple[list[tuple[socket.socket, bytes]], dict[str, Any]]:
    """Floods of `count` clients (at most `waves`, held) until every process in `pids` relays
    some: the processes share a flood, but the one awake first may take a whole wave."""
    held: list[tuple[socket.socket, bytes]] = []
    status: dict[str, Any] = {}
    for _ in range(waves):
        held += _flood(port, count)
        want = len(held)
        status = _wait(
            lambda want=want: (s := _status(control)) and len(s["sessions"]) == want and s,
            10,
            f"{len(held)} sessions",
        )
        if {session["pid"] for session in status["sessions"]} >= pids:
            break
    return held, status


def _finish(held: list[tuple[socket.socket, bytes]]) -> None:
    """Half-close each held client; the sink's sha256 of what it sent must come back."""
    for client, data in held:
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := client.recv(100):
            answer += chunk
        client.close()
        assert answer == hashlib.sha256(data).hexdigest().encode(), client


def _wait(condition: Any, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds}s: {what}")


@contextlib.contextmanager
def _instance(
    tmp_path: Path, sink: Sink, rules: str = "", workers: int = 2
) -> Iterator[tuple[int, Path, Proc, Path, int]]:
    port, control = free_port(), tmp_path / "ctl.sock"
    config = tmp_path / "workers.toml"
    metrics = free_port()
    config.write_text(
        f'workers = {workers}\n[control]\nsocket = "{control}"\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
        f'[[forward]]\nname = "web"\nlisten = "127.0.0.1:{port}"\nconnect = "127.0.0.1:{sink.port}"\n{rules}'
    )
    with started(portfwd_argv("run", "-c", str(config)), ready=READY) as proc:
        _wait(
            lambda: len([w for w in _status(control)["workers"] if w["state"] == "running"]) == workers - 1,
            15,
            "the workers run",
        )
        yield port, control, proc, config, metrics


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink().start()
    server.listener.listen(512)  # 40 clients at once: the sink's accept queue of 16 would overflow
    yield server
    server.close()


def test_clients_are_spread_over_the_workers_and_status_counts_them_all(tmp_path: Path, sink: Sink) -> None:
    with _instance(tmp_path, sink) as (port, control, proc, _, metrics_port):
        worker = _status(control)["workers"][0]["pid"]
        held, status = _spread(port, control, 40, {proc.pid, worker})
        count = len(held)
        pids = {session["pid"] for session in status["sessions"]}
        assert pids == {proc.pid, worker}  # both processes relay
        assert status["rules"][0]["connections_active"] == count
        assert len({session["id"] for session in status["sessions"]}) == count
        # One accept queue (the C engine's rule): one listening socket, held by both processes
        ss = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True)
        assert len(ss.stdout.splitlines()) == 1, ss.stdout
        assert f"pid={proc.pid}," in ss.stdout, ss.stdout
        assert f"pid={worker}," in ss.stdout, ss.stdout
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            metrics = response.read().decode()
        assert f'portfwd_connections_active{{rule="web"}} {count}.0' in metrics
        _finish(held)
        status = _wait(lambda: (s := _status(control)) and not s["sessions"] and s, 10, "all closed")
        assert status["rules"][0]["connections_total"] == count
        assert len([row for row in status["closed"] if row["rule"] == "web"]) == 20  # the newest 20
    assert proc.popen.returncode == 0
    assert "Traceback" not in "\n".join(proc.lines)


def test_five_processes_share_two_accept_queues(tmp_path: Path, sink: Sink) -> None:
    """At most four processes wake for one client: five form a SO_REUSEPORT group of two
    queues, process i (0: the main one) on queue i % 2; a flood crosses whole (sha256)."""
    with _instance(tmp_path, sink, workers=5) as (port, control, proc, _, _):
        status = _status(control)
        pids = [proc.pid] + [row["pid"] for row in sorted(status["workers"], key=lambda row: row["index"])]
        ss = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True)
        queues = ss.stdout.splitlines()
        assert len(queues) == 2, ss.stdout
        workers = {frozenset(pid for pid in pids[1:] if f"pid={pid}," in queue) for queue in queues}
        assert workers == {frozenset({pids[1], pids[3]}), frozenset({pids[2], pids[4]})}, ss.stdout
        assert all(f"pid={proc.pid}," in queue for queue in queues)  # it keeps every copy open
        held = _flood(port, 40)
        _wait(lambda: len(_status(control)["sessions"]) == 40, 10, "40 sessions")
        _finish(held)


def test_a_killed_worker_is_started_again_and_nothing_else_stops(tmp_path: Path, sink: Sink) -> None:
    with _instance(tmp_path, sink) as (port, control, proc, _, _):
        before = _status(control)["workers"][0]
        # some of them in the main process: they must live on
        held, status = _spread(port, control, 20, {proc.pid, before["pid"]})
        mine = [s for s in status["sessions"] if s["pid"] == proc.pid]
        assert mine
        os.kill(before["pid"], signal.SIGKILL)
        proc.wait_for(f"worker 1 (pid {before['pid']}) killed by SIGKILL")
        proc.wait_for("worker 1 started again")
        after = _wait(
            lambda: (
                (w := _status(control)["workers"][0])
                and w["state"] == "running"
                and w["pid"] != before["pid"]
                and w
            ),
            10,
            "a new worker",
        )
        assert after["restarts"] == 1
        assert after["last_exit"] == "killed by SIGKILL"
        # The main process's sessions were not touched; new clients are served by both again.
        survivors = [
            (client, data)
            for client, data in held
            if client.getsockname()[1] in {int(s["client"].rsplit(":", 1)[1]) for s in mine}
        ]
        _finish(survivors)
        more, status = _spread(port, control, 30, {proc.pid, after["pid"]})
        assert {session["pid"] for session in status["sessions"]} == {proc.pid, after["pid"]}
        _finish(more)
        for client, _ in held:
            client.close()


def test_reload_hands_new_rules_to_the_workers_and_counted_rules_stay_in_one_process(
    tmp_path: Path, sink: Sink
) -> None:
    with _instance(tmp_path, sink) as (_, control, proc, config, _):
        other, limited = free_port(), free_port()
        config.write_text(
            config.read_text()
            + f'[[forward]]\nname = "api"\nlisten = "127.0.0.1:{other}"\nconnect = "127.0.0.1:{sink.port}"\n'
            + "reuseport = true\n"  # a socket per process: the kernel's hash spreads even a trickle
            + f'[[forward]]\nname = "lim"\nlisten = "127.0.0.1:{limited}"\nconnect = "127.0.0.1:{sink.port}"\n'
            + "max_connections = 100\n"
        )
        reload = run_portfwd("reload", "--control", str(control))
        assert reload.returncode == 0, reload.stderr
        held = _hold(other, 30) + _hold(limited, 20)
        ss = subprocess.run(["ss", "-Hltn", f"sport = :{other}"], capture_output=True, text=True, check=True)
        assert len(ss.stdout.splitlines()) == 2, ss.stdout  # the SO_REUSEPORT group
        status = _wait(lambda: (s := _status(control)) and len(s["sessions"]) == 50 and s, 10, "50 sessions")
        worker = status["workers"][0]["pid"]
        by_rule: dict[str, set[int]] = {}
        for session in status["sessions"]:
            by_rule.setdefault(session["rule"], set()).add(session["pid"])
        assert by_rule == {"api": {proc.pid, worker}, "lim": {proc.pid}}
        _finish(held)


def test_workers_follow_the_main_process_health_checks(tmp_path: Path, sink: Sink) -> None:
    """Only the main process checks the backends; a worker takes its verdicts, so no process
    tries a backend the checks hold down (passive checks are off: a failed try would count)."""
    dead = free_port()
    pool = (
        f'[[forward]]\nname = "pool"\nlisten = "127.0.0.1:{{port}}"\n'
        f'connect = ["127.0.0.1:{sink.port}", "127.0.0.1:{dead}"]\n'
        '[forward.health]\ninterval = "0.2s"\ntimeout = "0.1s"\nfall = 1\nrise = 1\npassive_fall = 0\n'
    )
    port = free_port()
    with _instance(tmp_path, sink, pool.replace("{port}", str(port))) as (_, control, proc, _, _):

        def backends() -> list[dict[str, Any]]:
            rules = {rule["name"]: rule for rule in _status(control)["rules"]}
            return rules["pool"]["backends"]  # type: ignore[no-any-return]

        _wait(lambda: backends()[1]["state"] == "down", 10, "the dead backend is down")
        before = backends()[1]["failures"]
        held, status = _spread(port, control, 30, {proc.pid, _status(control)["workers"][0]["pid"]})
        assert {session["pid"] for session in status["sessions"]} == {proc.pid, status["workers"][0]["pid"]}
        assert backends()[1]["failures"] == before  # nobody tried it
        assert backends()[0]["sessions_active"] == len(held)
        _finish(held)
    checks = [line for line in proc.lines if "backend 127.0.0.1:" in line and " is down" in line]
    assert len(checks) == 1, checks  # said once, by the main process
