"""`portfwd status` against `ss`: every socket the kernel says portfwd holds is in the snapshot,
recently closed sessions tell the story the log tells, rates move, and piped output is whole.

portfwd runs as a subprocess, as users run it; `ss` reads the kernel; peers are plain sockets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import need_binary
from tests.integration.peers import free_port
from tests.integration.processes import READY, Proc, portfwd_argv, run_portfwd, started
from tests.integration.sshd import Sshd
from tests.integration.test_rules import free_range
from tests.integration.test_status import Sink, send_all

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


def status(config: Path) -> dict:  # type: ignore[type-arg]
    result = run_portfwd("status", "--json", "-c", str(config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def ss(pid: int, flags: str) -> list[tuple[str, str, str]]:
    """(state, local address, peer address) of every socket `ss -H{flags}p` shows for `pid`,
    one row a socket (with workers, a listener's group has one socket a process)."""
    ss_binary = need_binary("ss", "iproute2")
    listing = subprocess.run(
        [ss_binary, f"-H{flags}p"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    found = []
    for line in listing.splitlines():
        if f"pid={pid}," not in line:
            continue
        fields = line.split()
        if "x" in flags:  # [u_str] LISTEN 0 128 PATH INODE * 0 users:...
            state = "LISTEN" if "LISTEN" in fields else fields[0]
            found.append((state, next(item for item in fields if item.startswith("/")), ""))
        else:  # LISTEN/UNCONN/ESTAB 0 128 LOCAL PEER users:...
            found.append((fields[0], fields[3], fields[4]))
    return found


def closed_lines(proc: Proc) -> list[str]:
    """The reasons in portfwd's `... closed (REASON): ...` log lines, in order."""
    return re.findall(r" closed \((.*?)\): \d+ B up", proc.output())


@pytest.mark.root
def test_every_socket_ss_shows_for_portfwd_is_in_status_json(tmp_path: Path) -> None:
    sshd = Sshd(tmp_path).start()
    sink = Sink().start()
    try:
        web, v6, tunnel_port, metrics = free_port(), free_port(host="::1"), free_port(), free_port()
        pair = free_range(2)
        control, config = tmp_path / "ctl.sock", tmp_path / "portfwd.toml"
        config.write_text(
            f'[control]\nsocket = "{control}"\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
            f'[[forward]]\nname = "web"\nlisten = "127.0.0.1:{web}"\nconnect = "127.0.0.1:{sink.port}"\n'
            f'[[forward]]\nname = "pair"\nlisten = "127.0.0.1:{pair}-{pair + 1}"\n'
            f'connect = "127.0.0.1:{pair + 10}-{pair + 11}"\nprotocol = "tcp+udp"\n'
            f'[[forward]]\nname = "v6"\nlisten = "[::1]:{v6}"\nconnect = "127.0.0.1:{sink.port}"\n'
            f'[[tunnel]]\nname = "lab"\nssh = "root@127.0.0.1:{sshd.port}"\n'
            f'identity = "{sshd.user_key}"\nagent = false\nknown_hosts = "{sshd.known_hosts}"\n'
            f'ssh_config = "/dev/null"\nlocal = ["{tunnel_port}:127.0.0.1:{sink.port}"]\n'
        )
        with started(portfwd_argv("run", "-c", str(config)), ready=READY) as proc:
            deadline = time.monotonic() + 20
            snapshot = status(config)
            while snapshot["tunnels"][0]["state"] != "up" and time.monotonic() < deadline:
                time.sleep(0.05)  # polling a condition, bounded by the deadline
                snapshot = status(config)
            assert snapshot["tunnels"][0]["state"] == "up"
            tcp, udp, unix = ss(proc.pid, "ltn"), ss(proc.pid, "lun"), ss(proc.pid, "lxn")
            links = ss(proc.pid, "tn")  # established: the SSH connection
    finally:
        sink.close()
        sshd.kill()
    listening = snapshot["listening"]
    for protocol, seen in (("tcp", tcp), ("udp", udp), ("unix", unix)):
        shown = sorted(item["address"] for item in listening if item["protocol"] == protocol)
        assert shown == sorted(local for _, local, _ in seen), protocol
    assert {state for state, _, _ in tcp} == {"LISTEN"}
    assert [local for _, local, _ in unix] == [str(control)]
    rows = {(item["protocol"], item["address"]): item for item in listening}
    # both halves of the tunnel's `-L port` (like ssh: 127.0.0.1 and ::1), named by their forward
    for half in (f"127.0.0.1:{tunnel_port}", f"[::1]:{tunnel_port}"):
        assert rows["tcp", half]["kind"] == "tunnel"
        assert rows["tcp", half]["owner"].startswith("lab -L ")
        assert rows["tcp", half]["path"] == "ssh"
    for protocol in ("tcp", "udp"):
        assert [rows[protocol, f"127.0.0.1:{port}"]["owner"] for port in (pair, pair + 1)] == ["pair", "pair"]
    assert rows["udp", f"127.0.0.1:{pair}"]["path"] == "udp"
    assert rows["tcp", f"127.0.0.1:{web}"]["owner"] == "web"
    assert rows["tcp", f"[::1]:{v6}"]["owner"] == "v6"
    assert rows["tcp", f"127.0.0.1:{metrics}"]["kind"] == "metrics"
    assert rows["unix", str(control)]["kind"] == "control"
    assert [item["rule"] for item in snapshot["listeners"]] == ["web", "pair", "v6"], (
        "one row per rule, as before"
    )
    assert [row["name"] for row in snapshot["rules"]] == ["web", "pair", "v6"], "config order"
    # the SSH connection portfwd holds: its own socket, as the kernel lists it
    lab = snapshot["tunnels"][0]
    assert lab["peer"] == f"127.0.0.1:{sshd.port}"
    assert ("ESTAB", lab["local"], lab["peer"]) in links


def test_an_idle_timeout_shows_in_recently_closed_as_the_log_says_it(tmp_path: Path) -> None:
    sink = Sink().start()
    port, control, config = free_port(), tmp_path / "ctl.sock", tmp_path / "portfwd.toml"
    config.write_text(
        f'[control]\nsocket = "{control}"\n'
        f'[[forward]]\nname = "quiet"\nlisten = "127.0.0.1:{port}"\nconnect = "127.0.0.1:{sink.port}"\n'
        'idle_timeout = "1s"\n'
    )
    try:
        with started(portfwd_argv("run", "-c", str(config)), ready=READY) as proc:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(b"x" * 1000)
                mine = f"127.0.0.1:{client.getsockname()[1]}"
                proc.wait_for("closed (idle timeout)")
            snapshot = status(config)
            logged = closed_lines(proc)
    finally:
        sink.close()
    [row] = snapshot["closed"]
    assert (row["rule"], row["client"], row["target"]) == ("quiet", mine, f"127.0.0.1:{sink.port}")
    assert (row["bytes_up"], row["bytes_down"], row["reason"]) == (1000, 0, "idle timeout")
    assert 1.0 <= row["duration"] < 10.0
    assert row["ended"] - row["started"] == pytest.approx(row["duration"])
    assert logged == ["idle timeout"]


def test_recently_closed_sessions_tell_the_story_the_log_tells(tmp_path: Path) -> None:
    sink = Sink().start()
    port, refused = free_port(), free_port()
    control, config = tmp_path / "ctl.sock", tmp_path / "portfwd.toml"
    config.write_text(
        f'[control]\nsocket = "{control}"\n'
        f'[[forward]]\nname = "ok"\nlisten = "127.0.0.1:{port}"\nconnect = "127.0.0.1:{sink.port}"\n'
        f'[[forward]]\nname = "down"\nlisten = "127.0.0.1:{refused}"\nconnect = "127.0.0.1:{free_port()}"\n'
    )
    data = os.urandom(MiB)
    answer: list[bytes] = []
    try:
        with started(portfwd_argv("run", "-c", str(config)), ready=READY) as proc:
            send_all(port, data, answer)
            proc.wait_for(" closed (")
            with socket.create_connection(("127.0.0.1", refused), timeout=10) as client:
                assert client.recv(1) == b"", "portfwd closes a client whose upstream refused"
            proc.wait_for("failed: ")
            snapshot = status(config)
            logged = closed_lines(proc)
    finally:
        sink.close()
    assert answer == [hashlib.sha256(data).hexdigest().encode()]
    by_rule = {row["rule"]: row for row in snapshot["closed"]}
    assert (by_rule["ok"]["bytes_up"], by_rule["ok"]["bytes_down"]) == (MiB, 64)
    assert [by_rule["ok"]["reason"]] == logged
    assert by_rule["ok"]["reason"] != "closed", "the relay's own words"
    assert by_rule["down"]["reason"] == "upstream: connection refused"


@pytest.mark.parametrize("relay", ["splice", "protocol"])
def test_rates_move_while_bytes_flow_and_the_upstream_socket_is_the_kernels(
    tmp_path: Path, relay: str
) -> None:
    sink = Sink(pace=0.01).start()  # about 6 MiB/s at most: 16 MiB takes >= 2.5 s, samples fit
    port, control, config = free_port(), tmp_path / "ctl.sock", tmp_path / "portfwd.toml"
    config.write_text(
        f'[control]\nsocket = "{control}"\n'
        f'[[forward]]\nname = "bulk"\nlisten = "127.0.0.1:{port}"\nconnect = "127.0.0.1:{sink.port}"\n'
        f'relay = "{relay}"\n'
    )
    data = os.urandom(16 * MiB)
    answer: list[bytes] = []
    try:
        with started(portfwd_argv("run", "-c", str(config)), ready=READY) as proc:
            sender = threading.Thread(target=send_all, args=(port, data, answer))
            sender.start()
            rates: list[tuple[float, float, int]] = []
            table, links, session = "", [], {}
            deadline = time.monotonic() + 30
            while sender.is_alive() and time.monotonic() < deadline:
                snapshot = status(config)
                if snapshot["sessions"] and snapshot["sessions"][0]["rate_up"] > 0:
                    session, rule = snapshot["sessions"][0], snapshot["rules"][0]
                    rates.append((session["rate_up"], rule["rate_up"], session["bytes_up"]))
                    links = ss(session["pid"] or proc.pid, "tn")  # the process relaying it (workers)
                    table = run_portfwd("status", "-c", str(config)).stdout
                    break
                time.sleep(0.1)  # polling for a condition, bounded by the deadline
            sender.join(60)
            final = status(config)
    finally:
        sink.close()
    assert answer == [hashlib.sha256(data).hexdigest().encode()]
    assert rates, "a rate was seen while the transfer ran"
    session_rate, rule_rate, moved = rates[0]
    assert 0 < session_rate <= moved / 0.9, "bytes per second over the sampler's interval (1 s)"
    assert rule_rate >= session_rate, "the rule's rate over the same interval includes the session's"
    assert "up/s" in table
    assert re.search(r"\d KiB/s|\d MiB/s", table), table
    [closed] = final["closed"]
    assert closed["bytes_up"] == 16 * MiB
    assert session["path"] == relay
    assert ("ESTAB", session["upstream_local"], f"127.0.0.1:{sink.port}") in links
    assert session["upstream_local"] in table


def test_piped_status_and_check_print_whole_values_in_config_order(tmp_path: Path) -> None:
    long_name = "a-rule-with-a-name-long-enough-to-be-cut-" + "x" * 23  # 64 characters, the most
    target = "a-target-" + "y" * 50 + ".example:80"
    control = tmp_path / "ctl.sock"
    config = tmp_path / ("deep-" * 20) / "portfwd.toml"
    config.parent.mkdir()
    rules = [("zeta", free_port(), f"127.0.0.1:{free_port()}"), (long_name, free_port(), target)]
    text = f'[control]\nsocket = "{control}"\n'
    for name, port, connect in rules:
        text += f'[[forward]]\nname = "{name}"\nlisten = "127.0.0.1:{port}"\nconnect = "{connect}"\n'
    config.write_text(text)
    check = run_portfwd("check", "-c", str(config))
    assert check.returncode == 0, check.stderr
    with started(portfwd_argv("run", "-c", str(config)), ready=READY):
        shown = run_portfwd("status", "-c", str(config))
    assert shown.returncode == 0, shown.stderr
    for output in (check.stdout, shown.stdout):
        assert "…" not in output
        assert [line for line in output.splitlines() if long_name in line and target in line], (
            "one row with every value whole"
        )
    assert str(config.resolve()) in shown.stdout
    rows = [
        line.split()[0] for line in shown.stdout.splitlines() if line.split()[:1] in (["zeta"], [long_name])
    ]
    assert rows[:2] == ["zeta", long_name], "rules in config order, not sorted"


def test_watch_takes_an_interval_and_json_watch_prints_a_line_each_time(tmp_path: Path) -> None:
    control, config = tmp_path / "ctl.sock", tmp_path / "portfwd.toml"
    config.write_text(
        f'[control]\nsocket = "{control}"\n'
        f'[[forward]]\nname = "watched"\nlisten = "127.0.0.1:{free_port()}"\nconnect = "127.0.0.1:{free_port()}"\n'
    )
    with started(portfwd_argv("run", "-c", str(config)), ready=READY):
        watch = Proc(portfwd_argv("status", "--watch", "0.2", "-c", str(config)))
        lines = Proc(portfwd_argv("status", "--json", "--watch", "0.2", "-c", str(config)))
        try:
            for _ in range(3):
                watch.wait_for("portfwd ", start=watch.mark())
            for _ in range(3):
                lines.wait_for('"schema": 1', start=lines.mark())
            codes = (watch.stop(signal.SIGINT), lines.stop(signal.SIGINT))
        finally:
            watch.close()
            lines.close()
    assert codes == (130, 130)
    headers = [line for line in watch.lines if line.startswith("portfwd ")]
    assert len(headers) >= 3
    pictures = [json.loads(line) for line in lines.lines if line.startswith("{")]
    assert len(pictures) >= 3
    assert all(picture["rules"][0]["name"] == "watched" for picture in pictures)
    bad = run_portfwd("status", "--watch", "0", "-c", str(config))
    assert bad.returncode == 2
    assert "0.1" in bad.stderr


@pytest.mark.root
def test_a_tunnel_forwards_closed_session_is_kept_with_its_forward(tmp_path: Path) -> None:
    sshd = Sshd(tmp_path).start()
    sink = Sink().start()
    local, control, config = free_port(), tmp_path / "ctl.sock", tmp_path / "portfwd.toml"
    config.write_text(
        f'[control]\nsocket = "{control}"\n'
        f'[[tunnel]]\nname = "lab"\nssh = "root@127.0.0.1:{sshd.port}"\n'
        f'identity = "{sshd.user_key}"\nagent = false\nknown_hosts = "{sshd.known_hosts}"\n'
        f'ssh_config = "/dev/null"\nidle_timeout = "1s"\nlocal = ["127.0.0.1:{local}:127.0.0.1:{sink.port}"]\n'
    )
    try:
        with started(portfwd_argv("run", "-c", str(config)), ready=READY) as proc:
            with socket.create_connection(("127.0.0.1", local), timeout=10) as client:
                client.sendall(b"y" * 777)
                mine = f"127.0.0.1:{client.getsockname()[1]}"
                proc.wait_for("closed (idle timeout)", timeout=30)
            snapshot = status(config)
            logged = closed_lines(proc)
    finally:
        sink.close()
        sshd.kill()
    [row] = snapshot["closed"]
    assert row["rule"] == f"lab -L 127.0.0.1:{local} -> 127.0.0.1:{sink.port}"
    assert (row["client"], row["target"], row["path"]) == (mine, f"127.0.0.1:{sink.port}", "ssh")
    assert (row["bytes_up"], row["bytes_down"], row["reason"]) == (777, 0, "idle timeout")
    assert logged == ["idle timeout"]


def test_the_servers_listeners_and_upstream_sockets_are_what_ss_shows(tmp_path: Path) -> None:
    """`portfwd server`: its SSH listener and each client's -R port are listening rows; a -L
    session's upstream socket is the one the kernel lists, as on a rule's protocol path."""
    from tests.integration.test_server import Server, wait_port

    server = Server(tmp_path).start()
    sink = Sink().start()
    local, remote = free_port(), free_port()
    try:
        argv = server.ssh(
            "-L",
            f"127.0.0.1:{local}:127.0.0.1:{sink.port}",
            "-R",
            f"127.0.0.1:{remote}:127.0.0.1:{sink.port}",
        )
        with started(argv):
            wait_port(local)
            assert server.proc is not None
            server.proc.wait_for(f"listening on 127.0.0.1:{remote} for the client")
            with socket.create_connection(("127.0.0.1", local), timeout=10) as held:
                held.sendall(b"x" * 1000)  # the sink reads until EOF: the session stays open
                deadline = time.monotonic() + 15
                snapshot = status(server.config)
                while not any(row["bytes_up"] >= 1000 for row in snapshot["sessions"]):
                    assert time.monotonic() < deadline, snapshot["sessions"]
                    time.sleep(0.05)  # polling a condition, bounded by the deadline
                    snapshot = status(server.config)
                listening, links = ss(server.proc.pid, "ltn"), ss(server.proc.pid, "tn")
            after = status(server.config)
        # the client is gone: its -R port closes, and its row with it
        deadline = time.monotonic() + 15
        gone = status(server.config)
        while f"127.0.0.1:{remote}" in {item["address"] for item in gone["listening"]}:
            assert time.monotonic() < deadline, gone["listening"]
            time.sleep(0.05)  # polling a condition, bounded by the deadline
            gone = status(server.config)
    finally:
        sink.close()
        server.stop()
    rows = {item["address"]: item for item in snapshot["listening"] if item["protocol"] == "tcp"}
    assert sorted(rows) == sorted(address for _, address, _ in listening)
    assert (rows[f"127.0.0.1:{server.port}"]["kind"], rows[f"127.0.0.1:{server.port}"]["owner"]) == (
        "server",
        "server",
    )
    assert rows[f"127.0.0.1:{remote}"]["kind"] == "server"
    assert rows[f"127.0.0.1:{remote}"]["owner"].startswith("server alice@127.0.0.1:")
    assert rows[f"127.0.0.1:{remote}"]["path"] == "-R"
    [session] = [row for row in snapshot["sessions"] if row["bytes_up"] >= 1000]
    assert session["path"] == "ssh-server"
    assert ("ESTAB", session["upstream_local"], f"127.0.0.1:{sink.port}") in links
    assert f"127.0.0.1:{remote}" in {item["address"] for item in after["listening"]}, "still held"
    assert [item["kind"] for item in gone["listening"] if item["protocol"] == "tcp"] == ["server"]
