"""`relay = "kernel"` through the real CLI (#23): `portfwd run` and `portfwd forward --relay kernel`
in a throwaway network namespace, with socat peers; what crossed is checked by sha256, the
kernel's table and flows with nft and conntrack, the counters with `status --json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from portfwd.relay import native
from tests.conftest import need_binary
from tests.integration.netns import namespace, wait_listening_in
from tests.integration.processes import READY, REPO, Proc

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.netns]


def in_ns(ns: str, *argv: str, data: bytes = b"", timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], input=data, capture_output=True, timeout=timeout
    )


def portfwd_in(ns: str, *args: str, env: dict[str, str] | None = None) -> Proc:
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "portfwd", *args]
    return Proc(argv, env={**os.environ, "PORTFWD_KERNEL_REFRESH": "0.2", **(env or {})}, cwd=REPO)


def serve(ns: str, port: int, command: str, procs: list[Proc], udp: bool = False) -> None:
    listen = f"UDP4-RECVFROM:{port},fork" if udp else f"TCP4-LISTEN:{port},fork,reuseaddr"
    # -T: a forked child whose client's close never reaches it (the kernel relay's table was
    # removed first, so its FIN is not translated) ends after 30 s idle instead of outliving
    # the test; stopping the listener by PID does not reach its children.
    procs.append(Proc(["ip", "netns", "exec", ns, "socat", "-T", "30", listen, f"SYSTEM:{command}"]))
    if not udp:
        wait_listening_in(ns, port)
        return
    deadline = time.monotonic() + 10
    while not in_ns(ns, "ss", "-Hlun", f"sport = :{port}").stdout.strip():
        assert time.monotonic() < deadline, f"no UDP listener on {port}"
        time.sleep(0.02)


def status(ns: str, control: Path) -> dict[str, object]:
    answer = in_ns(ns, sys.executable, "-m", "portfwd", "status", "--json", "--control", str(control))
    assert answer.returncode == 0, answer.stderr
    loaded: dict[str, object] = json.loads(answer.stdout)
    return loaded


def tables(ns: str) -> str:
    return in_ns(ns, "nft", "list", "tables").stdout.decode()


def test_a_kernel_rule_carries_counts_reloads_and_cleans_up(tmp_path: Path) -> None:
    need_binary("conntrack", "conntrack")
    control = tmp_path / "ctl.sock"
    config = tmp_path / "kernel.toml"
    base = f'[control]\nsocket = "{control}"\n'
    config.write_text(
        base + '[[forward]]\nname = "web"\nlisten = "127.0.0.1:8001"\nconnect = "127.0.0.1:9001"\n'
        'protocol = "tcp+udp"\nrelay = "kernel"\n'
    )
    data = os.urandom(1 << 20)
    digest = hashlib.sha256(data).hexdigest()
    procs: list[Proc] = []
    with namespace("kr") as ns:
        try:
            serve(ns, 9001, "sha256sum", procs)
            serve(ns, 9001, "cat", procs, udp=True)
            serve(ns, 9002, "echo two", procs)
            proc = portfwd_in(ns, "run", "-c", str(config))
            procs.append(proc)
            proc.wait_for(READY)
            assert "web: forwarding 127.0.0.1:8001/tcp+udp -> 127.0.0.1:9001 in the kernel" in proc.output()
            assert "table inet portfwd_" in tables(ns)
            sent = in_ns(ns, "socat", "-t", "5", "-T", "10", "-", "TCP4:127.0.0.1:8001", data=data)
            assert sent.stdout.decode() == f"{digest}  -\n"
            udp = in_ns(ns, "socat", "-T", "3", "-", "UDP4:127.0.0.1:8001", data=b"datagram\n")
            assert udp.stdout == b"datagram\n"
            # The port is held: nobody can take it and be shadowed by the NAT.
            taken = in_ns(
                ns, sys.executable, "-c", "import socket; socket.socket().bind(('127.0.0.1', 8001))"
            )
            assert b"Address already in use" in taken.stderr
            deadline = time.monotonic() + 10
            while True:  # the counters are read every 0.2 s here
                (rule,) = status(ns, control)["rules"]  # type: ignore[misc]
                if rule["bytes_up"] >= len(data) and rule["connections_total"] >= 2:
                    break
                assert time.monotonic() < deadline, rule
                time.sleep(0.05)
            assert rule["relay"] == "kernel"
            assert rule["bytes_down"] > 0
            flows = status(ns, control)["kernel_sessions"]
            assert {(flow["rule"], flow["proto"], flow["public_port"]) for flow in flows} >= {  # type: ignore[union-attr]
                ("web", "tcp", 8001),
                ("web", "udp", 8001),
            }
            config.write_text(
                base + '[[forward]]\nname = "two"\nlisten = "127.0.0.1:8002"\nconnect = "127.0.0.1:9002"\n'
                'relay = "kernel"\n'
            )
            mark = proc.mark()
            reloaded = in_ns(ns, sys.executable, "-m", "portfwd", "reload", "--control", str(control))
            assert reloaded.returncode == 0, reloaded.stderr
            assert "reloaded " in proc.wait_for("reloaded", start=mark)
            assert ": 0 kept, 1 removed, 1 added, 0 failed" in proc.wait_for("reloaded", start=mark)
            assert in_ns(ns, "socat", "-T", "3", "-", "TCP4:127.0.0.1:8002").stdout == b"two\n"
            gone = in_ns(ns, "socat", "-T", "3", "-", "TCP4:127.0.0.1:8001", data=b"x")
            assert gone.stdout == b"", "the removed rule no longer forwards"
            assert proc.stop(signal.SIGTERM) == 0
            assert "kernel relays: table inet portfwd_" in proc.output()
            assert "portfwd_" not in tables(ns), "nothing left behind"
            left = in_ns(ns, "conntrack", "-L", "--dst-nat").stdout.decode()
            assert [line for line in left.splitlines() if "dport=8001" in line or "dport=8002" in line] == []
        finally:
            for each in procs:
                each.stop()
                each.close()


def test_a_held_port_is_refused_with_the_userspace_words(tmp_path: Path) -> None:
    procs: list[Proc] = []
    with namespace("kr") as ns:
        try:
            serve(ns, 8001, "echo squatter", procs)
            proc = portfwd_in(
                ns,
                "forward",
                "--relay",
                "kernel",
                "--control",
                str(tmp_path / "c.sock"),
                "8001:127.0.0.1:9001",
            )
            procs.append(proc)
            assert proc.popen.wait(timeout=30) == 1
            assert (
                "portfwd: nothing could start: *:8001: cannot listen on *:8001/tcp: address already in use "
                "(held for the kernel relay); another program (or rule) listens there; pick another port or stop it"
            ) in proc.output()
            assert "portfwd_" not in tables(ns)
        finally:
            for each in procs:
                each.stop()
                each.close()


def test_portfwd_forward_relay_kernel_redirects_low_ports(tmp_path: Path) -> None:
    procs: list[Proc] = []
    with namespace("kr") as ns:
        try:
            in_ns(ns, "ip", "addr", "add", "10.77.0.1/24", "dev", "lo")
            serve(ns, 8080, "echo unprivileged", procs)
            proc = portfwd_in(
                ns, "forward", "--relay", "kernel", "--control", str(tmp_path / "c.sock"), "80:127.0.0.1:8080"
            )
            procs.append(proc)
            proc.wait_for(READY)
            for host in ("127.0.0.1", "10.77.0.1"):
                assert in_ns(ns, "socat", "-T", "3", "-", f"TCP4:{host}:80").stdout == b"unprivileged\n", host
            assert proc.stop(signal.SIGTERM) == 0
        finally:
            for each in procs:
                each.stop()
                each.close()


def test_auto_takes_the_kernel_when_nothing_is_lost_and_says_why_not(tmp_path: Path) -> None:
    """With the suite's switch off (PORTFWD_AUTO_KERNEL=1), `relay = "auto"` as root: a plain
    rule goes to the kernel, IPv6 too, and /metrics shows it; a Unix target stays in userspace;
    a filtering table keeps every rule in userspace, and `check` says why."""
    procs: list[Proc] = []
    control = tmp_path / "ctl.sock"
    config = tmp_path / "auto.toml"
    config.write_text(
        f'[control]\nsocket = "{control}"\n[metrics]\nlisten = "127.0.0.1:9930"\n'
        '[[forward]]\nname = "plain"\nlisten = "127.0.0.1:8001"\nconnect = "127.0.0.1:9001"\n'
        '[[forward]]\nname = "six"\nlisten = "[::1]:8003"\nconnect = "[::1]:9003"\n'
        f'[[forward]]\nname = "unix"\nlisten = "127.0.0.1:8002"\nconnect = "unix:{tmp_path / "app.sock"}"\n'
    )
    switch = {"PORTFWD_AUTO_KERNEL": "1"}
    with namespace("kr") as ns:
        try:
            serve(ns, 9001, "echo kernel", procs)
            procs.append(
                Proc(
                    ["ip", "netns", "exec", ns, "socat", "TCP6-LISTEN:9003,fork,reuseaddr", "SYSTEM:echo six"]
                )
            )
            wait_listening_in(ns, 9003)
            checked = in_ns(
                ns,
                "env",
                "PORTFWD_AUTO_KERNEL=1",
                sys.executable,
                "-m",
                "portfwd",
                "check",
                "-c",
                str(config),
            )
            assert checked.returncode == 0, checked.stderr
            text = checked.stdout.decode()
            assert "kernel (nftables NAT; auto)" in text
            assert "splice (not kernel: a Unix socket target needs userspace)" in text
            proc = portfwd_in(ns, "run", "-c", str(config), env=switch)
            procs.append(proc)
            proc.wait_for(READY)
            assert "plain: forwarding 127.0.0.1:8001/tcp -> 127.0.0.1:9001 in the kernel" in proc.output()
            assert "six: forwarding [::1]:8003/tcp -> [::1]:9003 in the kernel" in proc.output()
            assert in_ns(ns, "socat", "-T", "3", "-", "TCP4:127.0.0.1:8001").stdout == b"kernel\n"
            assert in_ns(ns, "socat", "-T", "3", "-", "TCP6:[::1]:8003").stdout == b"six\n"
            deadline = time.monotonic() + 10
            while True:  # the kernel's counters reach /metrics as any rule's
                scraped = in_ns(ns, "curl", "-s", "http://127.0.0.1:9930/metrics").stdout.decode()
                if 'portfwd_connections_total{rule="plain"} 1.0' in scraped:
                    break
                assert time.monotonic() < deadline, scraped[-2000:]
                time.sleep(0.05)
            relays = {row["name"]: row["relay"] for row in status(ns, control)["rules"]}  # type: ignore[union-attr]
            assert relays == {"plain": "kernel", "six": "kernel", "unix": "splice"}
            assert proc.stop(signal.SIGTERM) == 0
            # A filtering table: auto stays in userspace, and check says why.
            firewall = 'table inet filter {\n chain input {\n  type filter hook input priority 0; policy drop;\n  iifname "lo" accept\n }\n}\n'
            assert in_ns(ns, "nft", "-f", "-", data=firewall.encode()).returncode == 0
            checked = in_ns(
                ns,
                "env",
                "PORTFWD_AUTO_KERNEL=1",
                sys.executable,
                "-m",
                "portfwd",
                "check",
                "-c",
                str(config),
            )
            engine = "C engine; " if native.available() else ""
            assert (
                f"splice ({engine}not kernel: table inet filter chain input filters traffic, and the kernel "
                "relay would change what it sees)"
            ) in checked.stdout.decode()
        finally:
            for each in procs:
                each.stop()
                each.close()


def test_a_changed_rule_moves_in_one_transaction_and_keeps_its_counts(tmp_path: Path) -> None:
    """A reload that changes a kernel rule's target: the port stays held throughout (nothing can
    take it), the new target answers, and the rule's totals carry on from the old table's."""
    procs: list[Proc] = []
    control = tmp_path / "ctl.sock"
    config = tmp_path / "kernel.toml"
    rule = '[[forward]]\nname = "web"\nlisten = "127.0.0.1:8003"\nconnect = "127.0.0.1:{port}"\nrelay = "kernel"\n'
    config.write_text(f'[control]\nsocket = "{control}"\n' + rule.format(port=9001))
    with namespace("kr") as ns:
        try:
            serve(ns, 9001, "echo one", procs)
            serve(ns, 9002, "echo two", procs)
            proc = portfwd_in(ns, "run", "-c", str(config))
            procs.append(proc)
            proc.wait_for(READY)
            for _ in range(3):
                assert in_ns(ns, "socat", "-T", "3", "-", "TCP4:127.0.0.1:8003").stdout == b"one\n"
            (before,) = status(ns, control)["rules"]  # type: ignore[misc]
            assert before["connections_total"] == 3
            config.write_text(f'[control]\nsocket = "{control}"\n' + rule.format(port=9002))
            mark = proc.mark()
            reloaded = in_ns(ns, sys.executable, "-m", "portfwd", "reload", "--control", str(control))
            assert reloaded.returncode == 0, reloaded.stderr
            proc.wait_for("reloaded", start=mark)
            assert "cannot listen" not in proc.output(), "the port was never let go"
            assert in_ns(ns, "socat", "-T", "3", "-", "TCP4:127.0.0.1:8003").stdout == b"two\n"
            (after,) = status(ns, control)["rules"]  # type: ignore[misc]
            assert after["connections_total"] == 4, "the old table's count carried over"
            assert proc.stop(signal.SIGTERM) == 0
        finally:
            for each in procs:
                each.stop()
                each.close()


def api(ns: str, verb: str, token: str) -> dict[str, object]:
    """POST /api/v1/rules/web/<verb> with curl inside the namespace: the JSON answer."""
    answer = in_ns(
        ns, "curl", "-s", "-S", "--max-time", "10", "-X", "POST", "-H", f"Authorization: Bearer {token}",
        f"http://127.0.0.1:9931/api/v1/rules/web/{verb}",
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    loaded: dict[str, object] = json.loads(answer.stdout)
    return loaded


def echoed(client: subprocess.Popen[bytes], line: bytes) -> bytes:
    """Write `line` to a socat client and read the line that comes back (within 10 s)."""
    assert client.stdin is not None
    assert client.stdout is not None
    client.stdin.write(line)
    client.stdin.flush()
    ready, _, _ = select.select([client.stdout], [], [], 10)
    assert ready, f"no answer to {line!r} within 10 s"
    return client.stdout.readline()


def live_client(ns: str, port: int) -> subprocess.Popen[bytes]:
    """A socat client of 127.0.0.1:`port` in `ns` that stays connected; one line echoed already."""
    pipe = subprocess.PIPE
    client = subprocess.Popen(
        ["ip", "netns", "exec", ns, "socat", "-", f"TCP4:127.0.0.1:{port}"], stdin=pipe, stdout=pipe
    )
    assert echoed(client, b"before\n") == b"before\n"
    return client


def wait_until(what: str, check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_pause_holds_new_flows_drain_refuses_them_and_live_flows_go_on(tmp_path: Path) -> None:
    """The web API's pause and drain on a kernel relay: paused, a new client's SYN is dropped
    until the resume (it waits, then gets through); draining, it is reset and counted as
    `draining`; a flow that was live before either goes on; the mode survives a reload."""
    control = tmp_path / "ctl.sock"
    token = "k" * 40
    token_file = tmp_path / "web.token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    config = tmp_path / "kernel.toml"
    config.write_text(
        f'[control]\nsocket = "{control}"\n[web]\nlisten = "127.0.0.1:9931"\ntoken_file = "{token_file}"\n'
        '[[forward]]\nname = "web"\nlisten = "127.0.0.1:8004"\nconnect = "127.0.0.1:9004"\nrelay = "kernel"\n'
    )
    procs: list[Proc] = []
    with namespace("kr") as ns:
        live = waiting = None
        try:
            serve(ns, 9004, "cat", procs)
            proc = portfwd_in(ns, "run", "-c", str(config))
            procs.append(proc)
            proc.wait_for(READY)
            live = live_client(ns, 8004)

            assert api(ns, "pause", token)["mode"] == "paused"
            assert 'drop comment "web (paused)"' in in_ns(ns, "nft", "list", "ruleset").stdout.decode()
            waiting = subprocess.Popen(
                ["ip", "netns", "exec", ns, "socat", "-T", "20", "-", "TCP4:127.0.0.1:8004,connect-timeout=20"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )  # fmt: skip
            wait_until(  # its SYN is dropped: it stays in SYN-SENT, retrying
                "the paused rule's new client waits",
                lambda: b"SYN-SENT" in in_ns(ns, "ss", "-Htan", "dport = :8004").stdout,
            )
            assert echoed(live, b"paused\n") == b"paused\n", "a paused rule's live flow goes on"
            assert api(ns, "resume", token)["mode"] == "running"
            sent, _ = waiting.communicate(b"held\n", timeout=30)  # its next SYN gets through
            assert sent == b"held\n"

            assert api(ns, "drain", token)["mode"] == "draining"
            for _ in range(3):
                refused = in_ns(ns, "socat", "-T", "5", "-", "TCP4:127.0.0.1:8004", data=b"x")
                assert b"Connection refused" in refused.stderr, refused.stderr
            assert echoed(live, b"draining\n") == b"draining\n", "a draining rule's live flow goes on"
            wait_until(
                "the refusals counted as draining",
                lambda: status(ns, control)["rules"][0]["errors"].get("draining") == 3,  # type: ignore[index]
            )
            shown = in_ns(ns, sys.executable, "-m", "portfwd", "status", "--control", str(control))
            assert "web (draining)" in shown.stdout.decode()

            config.write_text(
                config.read_text().replace('connect = "127.0.0.1:9004"', 'connect = "127.0.0.1:9005"')
            )
            mark = proc.mark()
            reloaded = in_ns(ns, sys.executable, "-m", "portfwd", "reload", "--control", str(control))
            assert reloaded.returncode == 0, reloaded.stderr
            proc.wait_for("reloaded", start=mark)
            (rule,) = status(ns, control)["rules"]  # type: ignore[misc]
            assert rule["mode"] == "draining", "the mode survives a reload, by name"
            assert rule["errors"]["draining"] == 3, "and its count carries over"
            refused = in_ns(ns, "socat", "-T", "5", "-", "TCP4:127.0.0.1:8004", data=b"x")
            assert b"Connection refused" in refused.stderr

            assert api(ns, "resume", token)["mode"] == "running"
            serve(ns, 9005, "echo five", procs)
            assert in_ns(ns, "socat", "-T", "5", "-", "TCP4:127.0.0.1:8004").stdout == b"five\n"
            assert proc.stop(signal.SIGTERM) == 0
            assert "portfwd_" not in tables(ns), "nothing left behind"
        finally:
            for client in (live, waiting):
                if client is not None:
                    client.kill()
                    client.communicate()
            for each in procs:
                each.stop()
                each.close()


def test_sigterm_drains_the_kernel_flows_and_refuses_new_ones(tmp_path: Path) -> None:
    """At SIGTERM a kernel relay drains as a userspace rule does: new clients are refused at
    once, a live flow goes on, and portfwd exits as soon as the last one ends (well before
    drain_timeout), leaving no table behind."""
    config = tmp_path / "kernel.toml"
    config.write_text(
        'drain_timeout = "60s"\n[control]\nenabled = false\n'
        '[[forward]]\nname = "web"\nlisten = "127.0.0.1:8006"\nconnect = "127.0.0.1:9006"\nrelay = "kernel"\n'
    )
    procs: list[Proc] = []
    with namespace("kr") as ns:
        live = None
        try:
            serve(ns, 9006, "cat", procs)
            proc = portfwd_in(ns, "run", "-c", str(config))
            procs.append(proc)
            proc.wait_for(READY)
            live = live_client(ns, 8006)
            mark = proc.mark()
            proc.popen.send_signal(signal.SIGTERM)
            assert "draining 1 session(s) for up to 60s" in proc.wait_for("draining", start=mark)
            wait_until(
                "the table drains",
                lambda: "draining" in in_ns(ns, "nft", "list", "ruleset").stdout.decode(),
            )
            refused = in_ns(ns, "socat", "-T", "5", "-", "TCP4:127.0.0.1:8006", data=b"x")
            assert b"Connection refused" in refused.stderr, refused.stderr
            assert echoed(live, b"during\n") == b"during\n", "a live flow goes on while it drains"
            assert proc.popen.poll() is None, "portfwd waits for it"
            began = time.monotonic()
            live.stdin.close()  # the client ends its flow: the drain is over
            assert live.wait(10) == 0
            live.stdout.close()
            live = None
            assert proc.popen.wait(30) == 0
            assert time.monotonic() - began < 30, "it did not wait for drain_timeout"
            assert "portfwd_" not in tables(ns), "nothing left behind"
        finally:
            if live is not None:
                live.kill()
                live.communicate()
            for each in procs:
                each.stop()
                each.close()


def test_a_rule_a_reload_changes_moves_between_the_kernel_and_userspace(tmp_path: Path) -> None:
    """`relay = "auto"`: a reload that gives a kernel rule a userspace-only setting moves it to
    userspace (its port and NAT let go first, so the listener binds and sees the clients); the
    reverse moves it back into the kernel's table."""
    control = tmp_path / "ctl.sock"
    config = tmp_path / "auto.toml"
    rule = '[[forward]]\nname = "web"\nlisten = "127.0.0.1:8007"\nconnect = "127.0.0.1:9007"\n'
    config.write_text(f'[control]\nsocket = "{control}"\n' + rule)
    procs: list[Proc] = []
    with namespace("kr") as ns:
        try:
            serve(ns, 9007, "echo seven", procs)
            proc = portfwd_in(ns, "run", "-c", str(config), env={"PORTFWD_AUTO_KERNEL": "1"})
            procs.append(proc)
            proc.wait_for(READY)
            assert "web: forwarding 127.0.0.1:8007/tcp -> 127.0.0.1:9007 in the kernel" in proc.output()
            for limited, relay in ((True, "splice"), (False, "kernel")):
                config.write_text(
                    f'[control]\nsocket = "{control}"\n' + rule + ("max_connections = 5\n" if limited else "")
                )
                mark = proc.mark()
                reloaded = in_ns(ns, sys.executable, "-m", "portfwd", "reload", "--control", str(control))
                assert reloaded.returncode == 0, (reloaded.stdout, reloaded.stderr)
                assert ": 0 kept, 1 removed, 1 added, 0 failed" in proc.wait_for("reloaded", start=mark)
                (row,) = status(ns, control)["rules"]  # type: ignore[misc]
                assert (row["relay"], row["running"]) == (relay, True), row
                assert in_ns(ns, "socat", "-T", "3", "-", "TCP4:127.0.0.1:8007").stdout == b"seven\n"
                assert ("portfwd_" in tables(ns)) is (relay == "kernel")
            assert proc.stop(signal.SIGTERM) == 0
        finally:
            for each in procs:
                each.stop()
                each.close()


def test_check_and_run_say_forwarding_is_off_in_the_kernel_relay_s_words(tmp_path: Path) -> None:
    """A remote target with IPv4 forwarding off (a new namespace's default): `check` warns
    before `run` does, both naming the sysctl and not the gateway's `enable_forwarding`."""
    config = tmp_path / "kernel.toml"
    config.write_text(
        "[control]\nenabled = false\n"
        '[[forward]]\nname = "far"\nlisten = "0.0.0.0:8008"\nconnect = "192.0.2.10:80"\nrelay = "kernel"\n'
    )
    expected = "kernel relay: IPv4 forwarding is off: run sysctl -w net.ipv4.ip_forward=1"
    with namespace("kr") as ns:
        checked = in_ns(ns, sys.executable, "-m", "portfwd", "check", "-c", str(config))
        assert checked.returncode == 0, checked.stderr
        assert f"portfwd: warning: {expected}\n" in checked.stderr.decode()
        proc = portfwd_in(ns, "run", "-c", str(config))
        try:
            proc.wait_for(READY)
            line = proc.wait_for("forwarding is off")
            assert line.endswith(expected), line
        finally:
            proc.stop()
            proc.close()
