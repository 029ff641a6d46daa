"""The [web] HTTP API against a real `portfwd run` (two workers): schemas, the token, Origin and
Host guards, errors, and every action doing what it says, seen by real clients."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import socket
import stat
import struct
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from tests.integration.peers import free_port
from tests.integration.processes import run_portfwd, wait_listening
from tests.integration.webpeer import TOKEN, WebInstance, echo_client, echo_flood, echo_server, web_instance

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with web_instance(tmp_path_factory.mktemp("web")) as running:
        yield running


def validator(document: dict[str, Any], name: str) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    )


def one_line_error(answer: Any, status: int) -> str:
    assert answer.status == status, (answer.status, answer.body)
    assert answer.headers["content-type"].startswith("application/json")
    message = answer.json["error"]
    assert isinstance(message, str)
    assert message
    assert "\n" not in message
    assert "Traceback" not in message
    return str(message)


def events(instance: WebInstance, count: int, token: str | None = None) -> list[tuple[str, Any]]:
    """The first `count` server-sent events of /api/v1/events, parsed."""
    connection = http.client.HTTPConnection("127.0.0.1", instance.port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connection.request("GET", "/api/v1/events", headers=headers)
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream"
    assert "script-src 'self'" in (response.getheader("Content-Security-Policy") or "")
    got: list[tuple[str, Any]] = []
    name, data = "", ""
    try:
        while len(got) < count:
            line = response.fp.readline().decode()
            assert line, "the stream ended"
            line = line.rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = line[len("data: ") :]
            elif not line and name:
                got.append((name, json.loads(data)))
                name, data = "", ""
    finally:
        connection.close()
    return got


def refused_by(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.settimeout(5)
        client.recv(10)


def test_every_read_matches_the_served_schema(instance: WebInstance) -> None:
    document = instance.call("GET", "/api/v1/openapi.json").json
    assert document["openapi"].startswith("3.1")
    Draft202012Validator.check_schema(document["components"]["schemas"]["Snapshot"])
    status = instance.call("GET", "/api/v1/status")
    assert status.status == 200  # auth = "actions": reads are open
    validator(document, "Snapshot").validate(status.json)
    assert [rule["name"] for rule in status.json["rules"]] == ["echo", "pool", "dgram"]
    validator(document, "Info").validate(instance.call("GET", "/api/v1/info").json)
    validator(document, "History").validate(instance.call("GET", "/api/v1/history").json)
    stream = events(instance, 3)
    assert [name for name, _ in stream] == ["history", "status", "status"]
    validator(document, "History").validate(stream[0][1])
    for _, snapshot in stream[1:]:
        validator(document, "Snapshot").validate(snapshot)
    for path in ("/api/v1/info", "/api/v1/status", "/", "/assets/app.js", "/nope"):
        headers = instance.call("GET", path).headers
        assert headers["content-security-policy"].startswith("default-src 'none'")
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["server"] == "portfwd"
    for path in document["paths"]:
        assert path.startswith("/api/v1/")


def test_every_action_and_error_answer_matches_the_served_schema(instance: WebInstance) -> None:
    document = instance.call("GET", "/api/v1/openapi.json").json
    done, failed = validator(document, "Done"), validator(document, "Error")
    paths = document["paths"]
    assert set(paths["/api/v1/rules/{rule}/{verb}"]["post"]["responses"]) >= {"200", "401", "404", "409"}
    for path in (
        "/api/v1/rules/echo/resume",
        "/api/v1/rules/pool/backends/x/check",
        "/api/v1/sessions/5/close",
    ):
        for token in (None, TOKEN):
            answer = instance.call("POST", path, token=token)
            (done if answer.status == 200 else failed).validate(answer.json)
            assert (
                str(answer.status)
                in paths[
                    {
                        "/api/v1/rules/echo/resume": "/api/v1/rules/{rule}/{verb}",
                        "/api/v1/rules/pool/backends/x/check": "/api/v1/rules/{rule}/backends/{backend}/check",
                        "/api/v1/sessions/5/close": "/api/v1/sessions/{session}/close",
                    }[path]
                ]["post"]["responses"]
            ), (path, answer.status)
    failed.validate(instance.call("GET", "/nowhere").json)


def test_actions_need_the_token_and_other_sites_are_refused(instance: WebInstance) -> None:
    answer = instance.call("POST", "/api/v1/rules/echo/pause")
    assert "send Authorization: Bearer" in one_line_error(answer, 401)
    assert answer.headers["www-authenticate"] == 'Bearer realm="portfwd"'
    assert "wrong token" in one_line_error(
        instance.call("POST", "/api/v1/rules/echo/pause", token="x" * 32), 401
    )
    foreign = {"Origin": "http://evil.example"}
    assert "origin 'http://evil.example' refused" in one_line_error(
        instance.call("POST", "/api/v1/rules/echo/pause", token=TOKEN, headers=foreign), 403
    )
    assert one_line_error(instance.call("GET", "/api/v1/status", headers=foreign), 403)
    assert "cross-site" in one_line_error(
        instance.call("POST", "/api/v1/reload", token=TOKEN, headers={"Sec-Fetch-Site": "cross-site"}), 403
    )
    assert "DNS rebinding" in one_line_error(
        instance.call("GET", "/api/v1/status", headers={"Host": f"rebind.example:{instance.port}"}), 403
    )
    linked = instance.call("GET", "/", headers={"Sec-Fetch-Site": "cross-site"})
    assert linked.status == 200, "a link from another site opens the page (framing it is refused)"
    assert linked.headers["x-frame-options"] == "DENY"
    assert one_line_error(instance.call("GET", "/api/v1/info", headers={"Sec-Fetch-Site": "cross-site"}), 403)
    own = {"Origin": f"http://127.0.0.1:{instance.port}", "Sec-Fetch-Site": "same-origin"}
    answer = instance.call("POST", "/api/v1/rules/echo/resume", token=TOKEN, headers=own)
    assert answer.status == 200
    assert answer.json == {"ok": True, "rule": "echo", "mode": "running"}
    assert instance.rule("echo")["mode"] == ""


def test_unknown_paths_methods_and_bad_bodies_get_one_line(instance: WebInstance) -> None:
    assert "no such path" in one_line_error(instance.call("GET", "/api/v2/status"), 404)
    answer = instance.call("PUT", "/api/v1/status")
    assert one_line_error(answer, 405) == "PUT is not allowed here; use GET,HEAD"
    assert answer.headers["allow"] == "GET,HEAD"
    close = "/api/v1/sessions/1/close"
    assert one_line_error(instance.call("POST", close, token=TOKEN, body=b"{"), 400).startswith(
        "body: not JSON ("
    )
    assert one_line_error(instance.call("POST", close, token=TOKEN, body=b"[1]"), 400) == (
        "body: expected a JSON object"
    )
    assert one_line_error(instance.call("POST", close, token=TOKEN, body=b'{"why": 1}'), 400) == (
        "body.why: unknown key; this action takes reason"
    )
    assert "reason" in one_line_error(instance.call("POST", close, token=TOKEN, body=b'{"reason": 7}'), 400)
    assert "not JSON" in one_line_error(instance.call("POST", close, token=TOKEN, body=b"\xff\xfe"), 400)
    assert one_line_error(instance.call("POST", "/api/v1/sessions/abc/close", token=TOKEN), 400).startswith(
        "session id 'abc' is not a session number"
    )
    for digits in ("%C2%B2", "%D9%A1"):  # "²" and an Arabic-Indic 1: digits to Python, not ids
        assert "is not a session number" in one_line_error(
            instance.call("POST", f"/api/v1/sessions/{digits}/close", token=TOKEN), 400
        )
    assert "no live session 999999" in one_line_error(
        instance.call("POST", "/api/v1/sessions/999999/close", token=TOKEN), 404
    )
    assert "no running rule named 'nope'" in one_line_error(
        instance.call("POST", "/api/v1/rules/nope/pause", token=TOKEN), 404
    )
    assert "too large" in one_line_error(instance.call("POST", close, token=TOKEN, body=b" " * 20000), 413)


def test_a_request_http_cannot_parse_gets_one_line_and_nothing_logged(instance: WebInstance) -> None:
    secret = "0" * 31 + "x"
    with socket.create_connection(("127.0.0.1", instance.port), timeout=10) as raw:
        raw.sendall(
            f"GET /api/v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {secret}\r\r\n\r\n".encode()
        )
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 ")), answer[:200]
    assert b"content-security-policy: default-src 'none'" in head.lower()
    assert b"server: portfwd" in head.lower()
    assert json.loads(body) == {"error": "the request is not HTTP this server can read"}
    instance.call("GET", "/api/v1/info")
    assert not [line for line in instance.proc.lines if secret in line or "Traceback" in line]


def test_close_a_live_session_from_either_process(instance: WebInstance) -> None:
    clients: list[socket.socket] = []
    try:
        for _ in range(3):  # bounded: floods of 12, shared by the processes (one may take a wave)
            clients += echo_flood(instance.rules["echo"], 12)
            want = len(clients)
            status = instance.wait(
                lambda s, want=want: len([x for x in s["sessions"] if x["rule"] == "echo"]) == want,
                "the sessions",
            )
            sessions = [row for row in status["sessions"] if row["rule"] == "echo"]
            if len({row["pid"] for row in sessions}) == 2:
                break
        assert len({row["pid"] for row in sessions}) == 2, "both processes relay some (workers = 2)"
        by_port = {int(row["client"].rsplit(":", 1)[1]): row for row in sessions}
        for client in clients:
            row = by_port[client.getsockname()[1]]
            answer = instance.call(
                "POST", f"/api/v1/sessions/{row['id']}/close", token=TOKEN, body=b'{"reason": "maintenance"}'
            )
            assert answer.status == 200, answer
            assert answer.json["session"] == row["id"]
            client.settimeout(5)
            assert client.recv(10) == b"", "the client sees its session end"
        status = instance.wait(lambda s: not [x for x in s["sessions"] if x["rule"] == "echo"], "no sessions")
        reasons = [row["reason"] for row in status["closed"] if row["rule"] == "echo"]
        assert set(reasons) == {"maintenance"}
        assert len(reasons) >= min(len(clients), 20)  # each process keeps its newest 20
    finally:
        for client in clients:
            client.close()


def test_close_a_udp_flow(instance: WebInstance) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.sendto(b"ping", ("127.0.0.1", instance.rules["dgram"]))
        assert client.recv(10) == b"ping"
        mine = f"127.0.0.1:{client.getsockname()[1]}"
        status = instance.wait(lambda s: any(x["client"] == mine for x in s["sessions"]), "the flow")
        (flow,) = [row for row in status["sessions"] if row["client"] == mine]
        assert flow["path"] == "udp"
        answer = instance.call("DELETE", f"/api/v1/sessions/{flow['id']}", token=TOKEN)
        assert answer.status == 200, answer
        status = instance.wait(lambda s: not any(x["client"] == mine for x in s["sessions"]), "flow closed")
        assert [row["reason"] for row in status["closed"] if row["client"] == mine] == ["closed by API"]
        client.sendto(b"again", ("127.0.0.1", instance.rules["dgram"]))  # a new flow begins
        assert client.recv(10) == b"again"


def test_pause_holds_new_clients_drain_refuses_them_and_live_sessions_go_on(instance: WebInstance) -> None:
    port = instance.rules["echo"]
    live = echo_client(port)
    waiting: list[socket.socket] = []
    try:
        assert instance.call("POST", "/api/v1/rules/echo/pause", token=TOKEN).json["mode"] == "paused"
        assert instance.rule("echo")["mode"] == "paused"
        for _ in range(4):  # the kernel queues them; nobody accepts while paused
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            client.sendall(b"held")
            client.settimeout(0.3)
            with pytest.raises(TimeoutError):
                client.recv(10)
            waiting.append(client)
        live.sendall(b"still")
        assert live.recv(10) == b"still", "a paused rule's live sessions go on"
        assert instance.call("POST", "/api/v1/rules/echo/resume", token=TOKEN).status == 200
        for client in waiting:  # taken from the backlog: nothing was lost
            client.settimeout(5)
            assert client.recv(10) == b"held"
        before = instance.rule("echo")["errors"].get("draining", 0)
        assert instance.call("POST", "/api/v1/rules/echo/drain", token=TOKEN).json["mode"] == "draining"
        for _ in range(6):  # whichever process takes one refuses it
            with pytest.raises(ConnectionResetError):  # at connect, or at the first read
                refused_by(port)
        live.sendall(b"drain")
        assert live.recv(10) == b"drain", "a draining rule's live sessions go on"
        row = instance.wait(
            lambda s: s["rules"][0]["errors"].get("draining", 0) >= before + 6, "draining counted"
        )
        assert row["rules"][0]["mode"] == "draining"
        metrics = run_portfwd("status", "-c", str(instance.config))
        assert "echo (draining)" in metrics.stdout
    finally:
        instance.call("POST", "/api/v1/rules/echo/resume", token=TOKEN)
        live.close()
        for client in waiting:
            client.close()
    echo_client(port).close()


def test_check_a_backend_now(instance: WebInstance) -> None:
    pool = instance.rule("pool")
    alive, dead = (backend["name"] for backend in pool["backends"])
    answer = instance.call("POST", f"/api/v1/rules/pool/backends/{alive}/check", token=TOKEN)
    assert answer.status == 200
    assert answer.json["passed"] is True
    assert answer.json["result"].startswith("ok in ")
    answer = instance.call("POST", f"/api/v1/rules/pool/backends/{dead}/check", token=TOKEN)
    assert answer.json["passed"] is False
    assert answer.json["result"] == "connection refused"
    backend = next(row for row in instance.rule("pool")["backends"] if row["name"] == dead)
    assert backend["last_check_result"] == "connection refused"
    assert backend["state"] == "up"
    assert "has no backend 'x'" in one_line_error(
        instance.call("POST", "/api/v1/rules/pool/backends/x/check", token=TOKEN), 404
    )
    assert "no backends to check" in one_line_error(
        instance.call("POST", "/api/v1/rules/echo/backends/x/check", token=TOKEN), 409
    )


def test_metrics_can_share_the_listener(tmp_path: Path) -> None:
    with web_instance(tmp_path, rules=("echo",), extra='[metrics]\nlisten = "127.0.0.1:PORT"\n') as running:
        answer = running.call("GET", "/metrics")
        assert answer.status == 200
        assert answer.headers["content-type"].startswith("text/plain; version=")
        assert 'portfwd_connections_total{rule="echo"}' in answer.body.decode()
        kinds = [row["kind"] for row in running.status()["listening"] if row["kind"] in ("web", "metrics")]
        assert kinds == ["web"], "one listener serves both"


def test_reload_through_the_api(tmp_path: Path) -> None:
    with web_instance(tmp_path, rules=("echo",)) as running:
        text = running.config.read_text()
        added = free_port()
        running.config.write_text(
            text.replace(
                "[web]",
                f'[[forward]]\nname = "added"\nlisten = "127.0.0.1:{added}"\nconnect = "127.0.0.1:{running.echo}"\n\n[web]',
            )
        )
        answer = running.call("POST", "/api/v1/reload", token=TOKEN)
        assert answer.status == 200, answer
        assert answer.json["ok"] is True
        assert [rule["name"] for rule in running.status()["rules"]] == ["echo", "added"]
        echo_client(added).close()
        running.config.write_text(text.replace("[web]", "[[forward]]\nname = 3\n[web]"))
        assert "forward[1].name" in one_line_error(running.call("POST", "/api/v1/reload", token=TOKEN), 409)


def test_a_reload_through_the_api_may_change_web_itself(tmp_path: Path) -> None:
    """The request that asks for the reload is served by the [web] the reload replaces: the
    reload goes on, and the new [web] serves; a listener shared with [metrics] splits."""
    shared = '[metrics]\nlisten = "127.0.0.1:PORT"\n'
    with web_instance(tmp_path, rules=("echo",), extra=shared) as running:
        assert running.call("GET", "/metrics").status == 200
        mark = running.proc.mark()
        metrics = free_port()
        text = running.config.read_text()
        running.config.write_text(
            text.replace(
                f'[metrics]\nlisten = "127.0.0.1:{running.port}"',
                f'[metrics]\nlisten = "127.0.0.1:{metrics}"',
            )
            + 'hosts = ["dash.example"]\n'
        )
        with contextlib.suppress(ConnectionError, http.client.HTTPException):
            running.call("POST", "/api/v1/reload", token=TOKEN)  # its answer may be cut off
        running.proc.wait_for(" reload", start=mark, timeout=15)
        wait_listening(metrics)
        wait_listening(running.port)
        assert (
            running.call("GET", "/api/v1/info", headers={"Host": f"dash.example:{running.port}"}).status
            == 200
        )
        assert running.call("GET", "/metrics").status == 404, "[metrics] moved to its own listener"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as scraped:
            assert b"portfwd_connections_total" in scraped.read()
        assert not [line for line in running.proc.lines[mark:] if "already in use" in line]


def test_status_url_reads_a_remote_instance(tmp_path: Path) -> None:
    web = f'[web]\nlisten = "127.0.0.1:PORT"\ntoken = "{TOKEN}"\nauth = "all"\n'
    with web_instance(tmp_path, rules=("echo",), web=web) as running:
        url = f"http://127.0.0.1:{running.port}"
        refused = run_portfwd("status", "--url", url)
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            f"portfwd: {url}/api/v1/status answered 401: this needs the [web] token: send Authorization: "
            "Bearer TOKEN; give --token-file FILE (the instance's [web] token_file)"
        )
        token = tmp_path / "token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        shown = run_portfwd("status", "--url", url, "--token-file", str(token))
        assert shown.returncode == 0, shown.stderr
        assert "echo" in shown.stdout
        assert f"127.0.0.1:{running.rules['echo']}" in shown.stdout
        as_json = run_portfwd("status", "--url", url + "/", "--token-file", str(token), "--json")
        assert json.loads(as_json.stdout)["rules"][0]["name"] == "echo"
        assert running.call("GET", "/api/v1/status").status == 401  # auth = "all": reads too
        assert running.call("GET", "/api/v1/info").status == 200  # the page can still ask for it
        if os.geteuid() != 0:
            token.chmod(0o644)
            loose = run_portfwd("status", "--url", url, "--token-file", str(token))
            assert loose.returncode == 2
            assert "readable by other users" in loose.stderr
    gone = run_portfwd("status", "--url", url)
    assert gone.returncode == 1
    assert "nothing answers at" in gone.stderr
    assert "connection refused" in gone.stderr


@pytest.mark.parametrize(
    ("web", "message"),
    [
        (
            'listen = "0.0.0.0:{port}"',
            "web.listen: 0.0.0.0:{port} is reachable from other hosts and [web] has no token",
        ),
        ('token = "short"', "web.token: too short (5 characters); use at least 32"),
        ('auth = "all"', 'web.auth: "all" needs a token to ask for'),
        (
            'token_file = "{dir}/missing"',
            "web.token_file: cannot read {dir}/missing: no such file or directory",
        ),
        ('token_file = "{dir}/loose"', "web.token_file: {dir}/loose is readable by other users (mode 0644)"),
    ],
)
def test_unsafe_web_settings_are_refused_before_start(tmp_path: Path, web: str, message: str) -> None:
    port = free_port()
    loose = tmp_path / "loose"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o644
    config = tmp_path / "web.toml"
    web = web.format(port=port, dir=tmp_path)
    listen = "" if "listen" in web else f'listen = "127.0.0.1:{port}"\n'
    config.write_text(f"[web]\n{listen}{web}\n")
    expected = message.format(port=port, dir=tmp_path)
    for command in ("check", "run"):
        result = run_portfwd(command, "-c", str(config))
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert expected in result.stderr or expected in result.stdout, (command, result.stderr)
        assert "Traceback" not in result.stderr


_PATHS = st.sampled_from(
    [
        "/",
        "/api/v1/status",
        "/api/v1/info",
        "/api/v1/reload",
        "/api/v1/rules/echo/pause",
        "/api/v1/rules/%00/drain",
        "/api/v1/sessions/1/close",
        "/api/v1/sessions/-1",
        "/api/v1/rules/echo/backends/%ff/check",
        "/assets/../../etc/passwd",
        "/api/v1/events?x=1",
        "/metrics",
    ]
) | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40).map(lambda tail: "/" + tail)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"]),
    path=_PATHS,
    body=st.none() | st.binary(max_size=300) | st.sampled_from([b"{}", b'{"reason":"x"}', b"[" * 5000]),
    origin=st.none() | st.sampled_from(["http://evil.example", "null", "http://127.0.0.1", "%%%"]),
    token=st.none() | st.sampled_from([TOKEN, "x", "Bearer"]),
)
def test_fuzzed_requests_never_break_the_server(
    instance: WebInstance, method: str, path: str, body: bytes | None, origin: str | None, token: str | None
) -> None:
    if method == "POST" and path.startswith("/api/v1/rules/echo/") and token == TOKEN and origin is None:
        path = "/api/v1/rules/echo/resume"  # never leave the shared rule paused or draining
    if method in ("POST", "DELETE") and path == "/api/v1/reload":
        token = None
    headers = {"Origin": origin} if origin else {}
    if path.startswith("/api/v1/events") and method == "GET":
        return  # the stream does not end; its own test reads it
    try:
        answer = instance.call(method, path, token=token, headers=headers, body=body, timeout=10)
    except http.client.InvalidURL:
        return  # http.client refuses to send it at all
    assert answer.status < 500, (method, path, answer.status, answer.body[:300])
    if answer.status >= 400 and method != "HEAD":
        one_line_error(answer, answer.status)
    assert instance.call("GET", "/api/v1/info").status == 200


class _CountingEcho:
    """An echo server on loopback that counts the connections it accepted; stopped by close()."""

    def __init__(self, port: int) -> None:
        self.accepted = 0
        self.echoed = 0  # connections that sent something (a client; a TCP check sends nothing)
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                data = conn.recv(65536)
                self.echoed += bool(data)
                while data:
                    conn.sendall(data)
                    data = conn.recv(65536)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()


def _lazy(stack: contextlib.ExitStack, tmp_path: Path, lazy: int, revived: int, health: str) -> WebInstance:
    """An instance whose rule "lazy" (on `lazy`) prefers backend `revived`, then an echo; one
    refused connect takes a backend down passively for 300 s; `health`: the other check keys."""
    echo = stack.enter_context(echo_server())
    extra = (
        f'[[forward]]\nname = "lazy"\nlisten = "127.0.0.1:{lazy}"\n'
        f'connect = ["127.0.0.1:{revived}", "127.0.0.1:{echo}"]\nbalance = "first"\n'
        "reuseport = true\n"  # the kernel's hash picks each client's process (_from_port)
        f'[forward.health]\n{health}passive_fall = 1\npassive_down = "300s"\n'
    )
    instance = stack.enter_context(web_instance(tmp_path, rules=("echo",), extra=extra))
    wait_listening(lazy)
    return instance


def test_a_check_that_passes_brings_a_passively_down_backend_back_in_every_worker(tmp_path: Path) -> None:
    """Both processes of `workers = 2` take a refusing backend down passively (for 300 s); once
    it listens again, a check from the API that passes brings it back in the workers too: every
    client after it, whichever process accepts it, reaches that backend."""
    revived, lazy = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        instance = _lazy(stack, tmp_path, lazy, revived, 'check = "none"\n')
        for _ in range(24):  # spread over both processes by the kernel (SO_REUSEPORT)
            echo_client(lazy).close()
        row = instance.rule("lazy")
        first = row["backends"][0]
        # a refused connect or more in each process (a burst's connects begin together), then down
        assert first["failures"] >= 2, row
        assert first["state"] == "down", row
        counting = _CountingEcho(revived)
        stack.callback(counting.close)
        answer = instance.call("POST", f"/api/v1/rules/lazy/backends/{first['name']}/check", token=TOKEN)
        assert answer.status == 200, answer
        assert answer.json["passed"] is True
        checked = counting.echoed  # (the check's own connect sends nothing)
        for _ in range(24):
            echo_client(lazy).close()
        assert counting.echoed - checked == 24


def _from_port(port: int, source: int) -> socket.socket:
    """A client of `port` from local port `source` (the kernel's SO_REUSEPORT choice of process
    follows the 4-tuple), that has had one echo back."""
    client = socket.socket()
    try:
        client.settimeout(5)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        client.bind(("127.0.0.1", source))
        client.connect(("127.0.0.1", port))
        client.sendall(b"ping")
        assert client.recv(10) == b"ping"
    except BaseException:
        client.close()
        raise
    return client


def _reset(client: socket.socket) -> None:
    """Close with a reset: no TIME_WAIT, so the same source port may connect again at once."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def test_an_active_check_that_passes_ends_a_passive_down_a_worker_reported(tmp_path: Path) -> None:
    """A worker's connects take a refusing backend down passively (for 300 s) while the main
    process, which took none of those clients, sees it up (its own checks fail too, but far
    from `fall`). The worker reports its passive down; once the backend listens again, the next
    passing check reaches the worker, and its clients reach that backend again."""
    revived, lazy = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        instance = _lazy(
            stack, tmp_path, lazy, revived, 'interval = "0.2s"\ntimeout = "0.2s"\nfall = 100\nrise = 1\n'
        )
        status = instance.wait(  # from now on each process serves its own share of the group
            lambda s: bool(s["workers"]) and all(row["state"] == "running" for row in s["workers"]),
            "the workers run",
        )
        workers = {row["pid"] for row in status["workers"]}
        healthy = _CountingEcho(revived)
        sources: list[int] = []  # which local ports land in a worker? (below the ephemeral range)
        clients: list[socket.socket] = []
        start = random.randrange(20000, 31000)
        for source in range(start, start + 200):  # bounded: 16 that are free
            with contextlib.suppress(OSError):
                clients.append(_from_port(lazy, source))
                sources.append(source)
            if len(sources) == 16:
                break
        names = {f"127.0.0.1:{source}" for source in sources}
        status = instance.wait(  # the page's snapshot is made once a second
            lambda s: names <= {row["client"] for row in s["sessions"]}, "the probes show"
        )
        for client in clients:
            _reset(client)
        found = {row["client"]: row["pid"] for row in status["sessions"] if row["client"] in names}
        worker_ports = [source for source in sources if found[f"127.0.0.1:{source}"] in workers][:4]
        assert worker_ports, "no client landed in a worker"
        healthy.close()
        _reset(_from_port(lazy, worker_ports[0]))  # refused by the backend: down in that worker
        first = instance.rule("lazy")["backends"][0]
        assert first["failures"] == 1, first  # in the worker (its passive down: tests/unit/test_merge.py)
        counting = _CountingEcho(revived)
        stack.callback(counting.close)
        instance.wait(
            lambda s: s["rules"][-1]["backends"][0]["last_check_result"].startswith("ok"), "a check passed"
        )
        before = counting.echoed
        deadline = time.monotonic() + 5
        while counting.echoed == before and time.monotonic() < deadline:  # bounded: until it follows
            _reset(_from_port(lazy, worker_ports[0]))
        assert counting.echoed > before, "the worker still holds it down passively"
        before = counting.echoed
        for source in worker_ports:
            _reset(_from_port(lazy, source))
        assert counting.echoed - before == len(worker_ports)
