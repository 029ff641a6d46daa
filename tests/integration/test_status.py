"""Seeing it and keeping it up: `portfwd status`, /metrics, reload under load, drain on SIGTERM.

portfwd runs as a subprocess, as users run it; peers are plain sockets in threads of the test.
"""

from __future__ import annotations

import contextlib
import hashlib
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

import pytest

from tests.conftest import need_binary
from tests.integration.peers import free_port
from tests.integration.processes import READY, Proc, portfwd_argv, run_portfwd, started

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


@dataclass
class Sink:
    """An upstream that reads everything (optionally paced), then answers with the sha256 hex."""

    pace: float = 0.0
    port: int = 0
    received: list[tuple[int, str]] = field(default_factory=list)
    listener: socket.socket = field(default_factory=socket.socket)
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Sink:
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        digest = hashlib.sha256()
        count = 0
        with conn:
            conn.settimeout(60)
            while chunk := conn.recv(64 * 1024):
                digest.update(chunk)
                count += len(chunk)
                if self.pace:
                    time.sleep(self.pace)  # a slow reader, so the transfer can be watched
            conn.sendall(digest.hexdigest().encode())
        self.received.append((count, digest.hexdigest()))
        self.done.set()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink(pace=0.01).start()  # 8 MiB takes >= 1.3 s: several status snapshots fit
    yield server
    server.close()


def send_all(port: int, data: bytes, answer: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := client.recv(4096):
            reply += chunk
        answer.append(reply)


def status(config: Path) -> dict:  # type: ignore[type-arg]
    result = run_portfwd("status", "--json", "-c", str(config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def write_config(path: Path, control: Path, rules: list[tuple[str, int, int]], extra: str = "") -> None:
    text = f'drain_timeout = "10s"\n[control]\nsocket = "{control}"\n{extra}'
    for name, listen, target in rules:
        text += (
            f'[[forward]]\nname = "{name}"\nlisten = "127.0.0.1:{listen}"\nconnect = "127.0.0.1:{target}"\n'
        )
    path.write_text(text)


def test_status_watches_a_transfer_and_totals_match_the_peer(sink: Sink, tmp_path: Path) -> None:
    port, control, config = free_port(), tmp_path / "ctl.sock", tmp_path / "portfwd.toml"
    write_config(config, control, [("bulk", port, sink.port)])
    data = os.urandom(8 * MiB)
    answer: list[bytes] = []
    with started(portfwd_argv("run", "-c", str(config)), ready=READY):
        assert oct(control.stat().st_mode & 0o777) == "0o600"
        seen: list[int] = []
        with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
            # In three parts, each seen in status before the next is sent (a status call may
            # take longer than the whole transfer would).
            for part, upto in enumerate((2 * MiB, 5 * MiB, 8 * MiB)):
                client.sendall(data[upto - (2 * MiB if part == 0 else 3 * MiB) : upto])
                deadline = time.monotonic() + 30
                while True:
                    sessions = status(config)["sessions"]
                    if sessions and sessions[0]["bytes_up"] >= upto:
                        assert sessions[0]["rule"] == "bulk"
                        assert sessions[0]["target"] == f"127.0.0.1:{sink.port}"
                        seen.append(sessions[0]["bytes_up"])
                        break
                    assert time.monotonic() < deadline, f"status never showed {upto} bytes up: {sessions}"
            client.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := client.recv(4096):  # bounded: the sink answers once, then closes
                reply += chunk
            answer.append(reply)
        assert len(set(seen)) == 3, f"bytes grew while the transfer ran: {seen}"
        assert seen == sorted(seen)
        deadline = time.monotonic() + 10
        while (final := status(config))["sessions"]:  # the relay notes the close a moment later
            assert time.monotonic() < deadline, f"the session never closed: {final['sessions']}"
        rule = next(item for item in final["rules"] if item["name"] == "bulk")
    assert sink.received == [(len(data), hashlib.sha256(data).hexdigest())]
    assert answer == [hashlib.sha256(data).hexdigest().encode()]
    assert final["sessions"] == []
    assert rule["bytes_up"] == sink.received[0][0] == 8 * MiB
    assert rule["bytes_down"] == len(answer[0]) == 64
    assert rule["connections_total"] == 1


def test_status_table_and_no_instance(tmp_path: Path) -> None:
    control, config = tmp_path / "ctl.sock", tmp_path / "portfwd.toml"
    write_config(config, control, [("web", free_port(), free_port())])
    result = run_portfwd("status", "-c", str(config))
    assert result.returncode == 1
    assert result.stderr == (
        f"portfwd: no running portfwd runs {config.resolve()}: nothing answers on {control}; "
        f"start it with portfwd run -c {config.resolve()}\n"
    )
    with started(portfwd_argv("run", "-c", str(config)), ready=READY):
        table = run_portfwd("status", "-c", str(config))
    assert table.returncode == 0
    assert "web" in table.stdout
    assert "no live sessions" in table.stdout
    assert not control.exists(), "the control socket file is removed at exit"


def test_metrics_counters_equal_the_bytes_that_crossed(tmp_path: Path) -> None:
    curl = need_binary("curl", "curl")
    socat = need_binary("socat", "socat")
    echo = free_port()
    port, metrics, control, config = (
        free_port(),
        free_port(),
        tmp_path / "ctl.sock",
        tmp_path / "portfwd.toml",
    )
    write_config(
        config, control, [("echo", port, echo)], extra=f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
    )
    data = os.urandom(MiB + 7)
    with (
        started([socat, f"TCP-LISTEN:{echo},bind=127.0.0.1,reuseaddr,fork", "EXEC:cat"]),
        started(portfwd_argv("run", "-c", str(config)), ready=READY) as proc,
    ):
        result = subprocess.run(
            [socat, "-t", "5", "-", f"TCP:127.0.0.1:{port}"],
            input=data,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
        proc.wait_for("closed (")
        body = subprocess.run(
            [curl, "-sS", f"http://127.0.0.1:{metrics}/metrics"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    samples = {
        name: float(value)
        for name, value in (
            line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#")
        )
    }
    assert samples['portfwd_bytes_total{direction="up",rule="echo"}'] == len(data)
    assert samples['portfwd_bytes_total{direction="down",rule="echo"}'] == len(data)
    assert samples['portfwd_connections_total{rule="echo"}'] == 1
    assert samples['portfwd_connections_active{rule="echo"}'] == 0
    assert samples['portfwd_upstream_connect_seconds_count{rule="echo"}'] == 1


def test_reload_under_load(tmp_path: Path) -> None:
    sink = Sink(pace=0.03).start()  # 8 MiB takes >= 3.8 s: longer than three reloads
    keep, added, removed = free_port(), free_port(), free_port()
    control, config = tmp_path / "ctl.sock", tmp_path / "portfwd.toml"
    write_config(config, control, [("keep", keep, sink.port), ("gone", removed, sink.port)])
    data = os.urandom(8 * MiB)
    answer: list[bytes] = []
    try:
        with started(portfwd_argv("run", "-c", str(config)), ready=READY) as proc:
            sender = threading.Thread(target=send_all, args=(keep, data, answer))
            sender.start()
            proc.wait_for("keep: 127.0.0.1:")  # the streaming session is open

            # 1: add a rule
            write_config(
                config,
                control,
                [("keep", keep, sink.port), ("gone", removed, sink.port), ("new", added, sink.port)],
            )
            mark = proc.mark()
            os.kill(proc.pid, signal.SIGHUP)
            proc.wait_for("reloaded", start=mark)
            with socket.create_connection(("127.0.0.1", added), timeout=5) as client:
                client.shutdown(socket.SHUT_WR)
                assert client.recv(64) == hashlib.sha256(b"").hexdigest().encode()

            # 2: remove a rule: it stops listening
            write_config(config, control, [("keep", keep, sink.port), ("new", added, sink.port)])
            mark = proc.mark()
            os.kill(proc.pid, signal.SIGHUP)
            proc.wait_for("reloaded", start=mark)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", removed), timeout=5)

            # 3: a broken config is refused; the old rules keep serving
            config.write_text(config.read_text() + "bogus = true\n")
            mark = proc.mark()
            os.kill(proc.pid, signal.SIGHUP)
            assert "forward[1].bogus: unknown key" in proc.wait_for("reload refused", start=mark)
            # ...and `portfwd reload` says so too, as a config error
            reload = run_portfwd("reload", "-c", str(config))
            assert reload.returncode == 2
            assert reload.stderr.startswith("portfwd: reload refused, the old config keeps running: ")
            with socket.create_connection(("127.0.0.1", added), timeout=5) as client:
                client.shutdown(socket.SHUT_WR)
                assert client.recv(64) == hashlib.sha256(b"").hexdigest().encode()

            assert sender.is_alive(), "the stream outlived three reloads (else make the sink slower)"
            sender.join(60)
    finally:
        sink.close()
    assert (len(data), hashlib.sha256(data).hexdigest()) in sink.received
    assert answer == [hashlib.sha256(data).hexdigest().encode()]


def test_sigterm_lets_a_session_finish_then_leaves_nothing(tmp_path: Path) -> None:
    sink = Sink(pace=0.02).start()  # 4 MiB takes >= 1.3 s: SIGTERM lands mid-transfer
    port, control, config = free_port(), tmp_path / "ctl.sock", tmp_path / "portfwd.toml"
    write_config(config, control, [("drain", port, sink.port)])
    data = os.urandom(4 * MiB)
    answer: list[bytes] = []
    proc = Proc(portfwd_argv("run", "-c", str(config)))
    try:
        proc.wait_for(READY)
        sender = threading.Thread(target=send_all, args=(port, data, answer))
        sender.start()
        proc.wait_for("drain: 127.0.0.1:")
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait_for("draining 1 session(s)")
        sender.join(30)
        assert proc.popen.wait(30) == 0
    finally:
        proc.stop()
        proc.close()
        sink.close()
    assert answer == [hashlib.sha256(data).hexdigest().encode()], (
        "the session finished inside the drain window"
    )
    listening = subprocess.run(
        ["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True, check=False
    )
    assert listening.stdout.strip() == ""
    assert not control.exists()


def test_status_watch_refreshes_until_ctrl_c(tmp_path: Path) -> None:
    control, config = tmp_path / "ctl.sock", tmp_path / "portfwd.toml"
    write_config(config, control, [("watched", free_port(), free_port())])
    with started(portfwd_argv("run", "-c", str(config)), ready=READY):
        watch = Proc(portfwd_argv("status", "--watch", "-c", str(config)))
        try:
            watch.wait_for("watched")
            code = watch.stop(signal.SIGINT)
        finally:
            watch.close()
    assert code == 130
    assert "Traceback" not in "\n".join(watch.lines)


def test_second_signal_closes_sessions_at_once(tmp_path: Path) -> None:
    sink = Sink(pace=0.05).start()  # far too slow to finish 8 MiB within the 10 s drain
    port, control, config = free_port(), tmp_path / "ctl.sock", tmp_path / "portfwd.toml"
    write_config(config, control, [("slow", port, sink.port)])
    proc = Proc(portfwd_argv("run", "-c", str(config)))
    client = None
    try:
        proc.wait_for(READY)
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        client.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            client.send(os.urandom(8 * MiB))
        proc.wait_for("slow: 127.0.0.1:")
        started_at = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait_for("draining 1 session(s)")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.popen.wait(10) == 0
        assert time.monotonic() - started_at < 5, "did not wait for the 10 s drain"
        assert "closed (shutdown)" in proc.output()
    finally:
        if client is not None:
            client.close()
        proc.stop()
        proc.close()
        sink.close()


def _session_logs(log_format: str, sink: Sink) -> list[str]:
    """The log lines of one `portfwd forward` run: ready, one session through it, stop."""
    port = free_port()
    payload = os.urandom(64 * 1024)
    with started(
        portfwd_argv("forward", "--log-format", log_format, f"127.0.0.1:{port}:127.0.0.1:{sink.port}")
    ) as proc:
        proc.wait_for(READY if log_format == "text" else '"event": "ready"')
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := client.recv(4096):
                answer += chunk
        assert answer.decode() == hashlib.sha256(payload).hexdigest()
        proc.wait_for("closed (")
        assert proc.stop() == 0
        return [line for line in proc.output().splitlines() if line.strip()]


def test_json_logs_carry_each_event_and_its_fields() -> None:
    """--log-format json: one object a line, the event named, the session's story in fields
    (no sentence to parse), and the same lines as the text format, in the same order."""
    sink = Sink().start()
    try:
        lines = _session_logs("json", sink)
        text = _session_logs("text", sink)
    finally:
        sink.listener.close()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert [record["event"] for record in records] == [
        "control.listening",
        "rule.listening",
        "ready",
        "session.open",
        "session.closed",
        "stopping",
        "stopped",
    ]
    by_event = {record["event"]: record for record in records}
    closed = by_event["session.closed"]
    rule = by_event["rule.listening"]["rule"]
    assert closed["rule"] == rule == by_event["session.open"]["rule"]
    assert closed["client"].startswith("127.0.0.1:")
    assert closed["target"] == f"127.0.0.1:{sink.port}"
    assert closed["reason"] == "client closed"  # its half-close came first
    assert (closed["bytes_up"], closed["bytes_down"]) == (64 * 1024, 64)
    assert isinstance(closed["duration_s"], float)
    assert closed["duration_s"] >= 0
    assert closed["path"] in ("splice", "protocol")
    assert by_event["ready"]["rules"] == 1
    assert {record["level"] for record in records} == {"info"}
    # The text format writes the same events: one line each, the same words as `msg`.
    assert len(text) == len(records)
    for line, record in zip(text, records, strict=True):
        words = line.split(" ", 3)[3]  # after "date time LEVEL"
        assert words.split(":")[0] == record["msg"].split(":")[0], (line, record["msg"])


def test_a_log_nobody_reads_never_stops_the_relay(tmp_path: Path) -> None:
    """stderr is a pipe this test does not read while 1000 sessions go through (two log lines
    each: far more than the pipe holds). Every session is served at once; once the pipe is read,
    every line is there (cli/logwriter.py writes them from a thread of its own)."""
    sink = Sink().start()
    port, control = free_port(), tmp_path / "ctl.sock"
    proc = subprocess.Popen(
        portfwd_argv("forward", "--control", str(control), f"127.0.0.1:{port}:127.0.0.1:{sink.port}"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    sessions = 1000
    try:
        deadline = time.monotonic() + 15
        while run_portfwd("status", "--control", str(control)).returncode != 0:
            assert proc.poll() is None, "portfwd exited"
            assert time.monotonic() < deadline, "portfwd did not start"
            time.sleep(0.05)  # polling the control socket, bounded by the deadline
        for index in range(sessions):
            answer: list[bytes] = []
            send_all(port, b"%d" % index, answer)  # each bounded by the socket's timeout
            assert answer == [hashlib.sha256(b"%d" % index).hexdigest().encode()], index
        os.kill(proc.pid, signal.SIGTERM)
        _, log = proc.communicate(timeout=30)  # read at last: the writer catches up, then exits
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sink.close()
    assert proc.returncode == 0
    lines = log.decode().splitlines()
    opened = [line.split(" -> ")[0].rsplit(" ", 1)[-1] for line in lines if " open (" in line]
    closed = [line.split(" -> ")[0].rsplit(" ", 1)[-1] for line in lines if " closed (" in line]
    odd = [line for line in lines if line.count(" open (") + line.count(" closed (") != 1]
    assert (len(opened), len(closed)) == (sessions, sessions), (set(opened) ^ set(closed), odd[-8:])
