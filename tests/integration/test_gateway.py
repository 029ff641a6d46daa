"""`portfwd gateway` and `portfwd run` with [gateway] in the lan / gw / wan lab (TESTBED §1-2).

Every check is made with real packets between namespaces: socat peers, sha256 of what crossed,
and the address the peer saw.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import need_binary
from tests.integration.processes import READY, REPO, Proc
from tests.integration.topology import GW_WAN, LAN_HOST, WAN_HOST, Lab, lab

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.netns]

REPLY = "echo peer=$SOCAT_PEERADDR; sha256sum"


def portfwd(ns: Lab, *args: str) -> subprocess.CompletedProcess[bytes]:
    env_python = [sys.executable, "-m", "portfwd", *args]
    return subprocess.run(
        ["ip", "netns", "exec", ns.gw, *env_python], capture_output=True, timeout=60, cwd=REPO
    )


def write_config(path: Path, extra: str = "") -> None:
    path.write_text(
        '[control]\nenabled = false\n[gateway]\nwan = "gwwan0"\nlan = "gwlan0"\n'
        f'[[gateway.forward]]\nport = 8080\nto = "{LAN_HOST}:80"\nprotocol = "tcp+udp"\n'
        f'[[gateway.forward]]\nport = "8000-8001"\nto = "{LAN_HOST}:9000-9001"\n'
        f'[[gateway.forward]]\nport = 9090\nto = "{LAN_HOST}:80"\nallow = ["198.51.100.0/24"]\n' + extra
    )


def tcp_from(net: Lab, ns: str, host: str, port: int, data: bytes) -> str:
    result = net.run(
        ns, "socat", "-t", "5", "-T", "10", "-", f"TCP4:{host}:{port},connect-timeout=2", data=data
    )
    return result.stdout.decode(errors="replace")


def status_rows(config: Path, key: str) -> list[dict[str, object]]:
    """One list from `portfwd status --json` of the instance running `config` (empty until it answers)."""
    answer = subprocess.run(
        [sys.executable, "-m", "portfwd", "status", "--json", "-c", str(config)],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    rows: list[dict[str, object]] = json.loads(answer.stdout)[key] if answer.returncode == 0 else []
    return rows


def tables(net: Lab) -> str:
    return net.run(net.gw, "nft", "list", "tables").stdout.decode()


def test_apply_dnat_range_allow_masquerade_and_remove(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    write_config(config)
    data = os.urandom(1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    with lab() as net:
        net.serve(net.lan, 80, REPLY)
        net.serve(net.lan, 9001, "echo port=9001")
        net.serve(net.lan, 80, "cat", udp=True)
        net.serve(net.wan, 9000, "echo peer=$SOCAT_PEERADDR")
        assert tcp_from(net, net.wan, GW_WAN, 8080, data) == "", "no forward before apply"
        assert tcp_from(net, net.lan, WAN_HOST, 9000, b"") == "", "no masquerade before apply"

        plan = portfwd(net, "gateway", "plan", "-c", str(config))
        assert plan.returncode == 0, plan.stderr
        assert b"dnat ip to tcp dport map @dnat_tcp" in plan.stdout
        assert b"nft -c accepts this ruleset; not loaded now" in plan.stdout
        applied = portfwd(net, "gateway", "apply", "-c", str(config))
        assert applied.returncode == 0, applied.stderr

        reply = tcp_from(net, net.wan, GW_WAN, 8080, data)
        assert reply.splitlines() == [f"peer={WAN_HOST}", f"{digest}  -"], (
            "the LAN service sees the real client"
        )
        udp = net.run(net.wan, "socat", "-T", "3", "-", f"UDP4:{GW_WAN}:8080", data=b"datagram\n")
        assert udp.stdout == b"datagram\n"
        assert tcp_from(net, net.wan, GW_WAN, 8001, b"") == "port=9001\n", "a range keeps its offset"
        assert tcp_from(net, net.wan, GW_WAN, 9090, data) == "", "9090 only for 198.51.100.0/24"
        assert tcp_from(net, net.lan, WAN_HOST, 9000, b"") == f"peer={GW_WAN}\n", "masquerade"

        removed = portfwd(net, "gateway", "remove")
        assert removed.returncode == 0, removed.stderr
        assert "portfwd" not in tables(net)
        assert tcp_from(net, net.wan, GW_WAN, 8080, data) == ""


def test_run_applies_restores_after_drift_and_removes_on_exit(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    write_config(config)
    control = tmp_path / "ctl.sock"
    config.write_text(config.read_text().replace("enabled = false", f'socket = "{control}"'))
    with lab() as net:
        net.serve(net.lan, 80, REPLY)
        env = {**os.environ, "PORTFWD_GATEWAY_CHECK": "0.3"}
        proc = Proc(
            ["ip", "netns", "exec", net.gw, sys.executable, "-m", "portfwd", "run", "-c", str(config)],
            env=env,
            cwd=REPO,
        )
        try:
            proc.wait_for(READY)
            assert "table inet portfwd" in tables(net)
            assert tcp_from(net, net.wan, GW_WAN, 8080, b"x").startswith(f"peer={WAN_HOST}")
            mark = proc.mark()
            net.run(net.gw, "nft", "delete", "table", "inet", "portfwd")
            proc.wait_for("removed behind our back; applying it again", start=mark)
            proc.wait_for("table inet portfwd applied again", start=mark)
            assert tcp_from(net, net.wan, GW_WAN, 8080, b"x").startswith(f"peer={WAN_HOST}")
            mark = proc.mark()
            net.run(net.gw, "nft", "flush", "chain", "inet", "portfwd", "prerouting")  # changed, not deleted
            proc.wait_for("changed behind our back; applying it again", start=mark)
            proc.wait_for("table inet portfwd applied again", start=mark)
            assert tcp_from(net, net.wan, GW_WAN, 8080, b"x").startswith(f"peer={WAN_HOST}")
            deadline = time.monotonic() + 10
            counted = 0
            while time.monotonic() < deadline and not counted:  # counters are read every 0.3 s here
                rows = status_rows(config, "gateway_rules")
                counted = sum(row["packets"] for row in rows if row["rule"] == "gateway.forward tcp")
                time.sleep(0.1)
            # nat chains see a connection's first packet only, and the re-applied table started
            # from zero: exactly the one connection made after the drift.
            assert counted == 1
            assert proc.stop(signal.SIGTERM) == 0
            assert "portfwd" not in tables(net), "removed on exit"
        finally:
            proc.stop()
            proc.close()


def test_a_bad_ruleset_changes_nothing(tmp_path: Path) -> None:
    """A config nft refuses (overlapping allow networks) names the rule; the old table keeps working."""
    config = tmp_path / "gateway.toml"
    write_config(config)
    bad = tmp_path / "bad.toml"
    write_config(bad)
    bad.write_text(bad.read_text().replace('["198.51.100.0/24"]', '["198.51.100.0/24", "198.51.100.128/25"]'))
    with lab() as net:
        net.serve(net.lan, 80, REPLY)
        assert portfwd(net, "gateway", "apply", "-c", str(config)).returncode == 0
        same = portfwd(net, "gateway", "plan", "-c", str(config)).stdout.decode()
        assert "# nft -c accepts this ruleset; the live table inet portfwd is the same\n" in same
        changed = tmp_path / "changed.toml"
        changed.write_text(config.read_text().replace("port = 8080", "port = 8081"))
        plan = portfwd(net, "gateway", "plan", "-c", str(changed)).stdout.decode()
        diff = plan.split("differs (- live, + this plan):\n", 1)[1].splitlines()
        assert diff[:2] == ["# --- live table", "# +++ this plan"]
        minus = [line for line in diff if line.startswith("# -\t")]
        plus = [line for line in diff if line.startswith("# +\t")]
        assert any('8080 comment "gateway.forward[0]"' in line for line in minus), diff
        assert any('8081 comment "gateway.forward[0]"' in line for line in plus), diff
        refused = portfwd(net, "gateway", "apply", "-c", str(bad))
        assert (refused.returncode, refused.stderr.decode()) == (
            1,
            "portfwd: gateway.forward[2].allow: nft refused it: conflicting intervals specified "
            "(198.51.100.128/25); nothing changed, the previous ruleset stays\n",
        )
        assert tcp_from(net, net.wan, GW_WAN, 8080, b"x").startswith(f"peer={WAN_HOST}"), (
            "the old ruleset still works"
        )
        assert portfwd(net, "gateway", "remove").returncode == 0


def test_port_trigger_opens_and_closes_after_idle(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[control]\nenabled = false\n[gateway]\nwan = "gwwan0"\nlan = "gwlan0"\n'
        '[[gateway.trigger]]\ntrigger = "tcp/6667"\nopen = ["tcp/7000-7010", "udp/7100"]\nidle_timeout = "2s"\n'
    )
    with lab() as net:
        net.serve(net.lan, 7005, REPLY)
        net.serve(net.lan, 7100, "cat", udp=True)
        net.serve(net.wan, 6667, "echo irc")
        assert portfwd(net, "gateway", "apply", "-c", str(config)).returncode == 0
        try:
            assert tcp_from(net, net.wan, GW_WAN, 7005, b"x") == "", "closed before the trigger"
            assert tcp_from(net, net.lan, WAN_HOST, 6667, b"") == "irc\n", "the LAN host connects out"
            reply = tcp_from(net, net.wan, GW_WAN, 7005, b"x")
            assert reply.splitlines()[0] == f"peer={WAN_HOST}", "opened to the triggering host"
            udp = net.run(net.wan, "socat", "-T", "3", "-", f"UDP4:{GW_WAN}:7100", data=b"dgram\n")
            assert udp.stdout == b"dgram\n"
            began = time.monotonic()
            while time.monotonic() - began < 10:  # bounded: the element expires 2 s after the last packet
                time.sleep(0.5)
                listed = net.run(
                    net.gw, "nft", "list", "map", "inet", "portfwd", "trig_host_0"
                ).stdout.decode()
                if "elements" not in listed:
                    break
            assert "elements" not in listed, "the trigger expired"
            assert tcp_from(net, net.wan, GW_WAN, 7005, b"x") == "", "closed again after idle_timeout"
            # Once expired, the ports are free: a second LAN host triggers and gets them.
            second = "192.168.77.11"
            net.run(net.lan, "ip", "addr", "add", f"{second}/24", "dev", "lan0")
            net.serve(net.lan, 7006, "echo local=$SOCAT_SOCKADDR")
            out = net.run(
                net.lan, "socat", "-T", "3", "-", f"TCP4:{WAN_HOST}:6667,bind={second},connect-timeout=2"
            )
            assert out.stdout == b"irc\n"
            assert tcp_from(net, net.wan, GW_WAN, 7006, b"") == f"local={second}\n"
        finally:
            portfwd(net, "gateway", "remove")


def test_last_wins_trigger_hands_the_ports_to_the_newest_host(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[control]\nenabled = false\n[gateway]\nwan = "gwwan0"\nlan = "gwlan0"\n'
        '[[gateway.trigger]]\ntrigger = "tcp/6667"\nopen = ["tcp/7000-7010"]\nidle_timeout = "30s"\nmode = "last-wins"\n'
    )
    with lab() as net:
        second = "192.168.77.11"
        net.run(net.lan, "ip", "addr", "add", f"{second}/24", "dev", "lan0")
        net.serve(net.lan, 7005, "echo local=$SOCAT_SOCKADDR")
        net.serve(net.wan, 6667, "echo irc")
        proc = Proc(
            ["ip", "netns", "exec", net.gw, sys.executable, "-m", "portfwd", "run", "-c", str(config)],
            cwd=REPO,
        )
        try:
            proc.wait_for(READY)
            for host in (LAN_HOST, second):
                mark = proc.mark()
                for _ in range(20):  # bounded: conntrack -E prints no ready line, so trigger until it is seen
                    net.run(
                        net.lan,
                        "socat",
                        "-T",
                        "3",
                        "-",
                        f"TCP4:{WAN_HOST}:6667,bind={host},connect-timeout=2",
                    )
                    try:
                        proc.wait_for(f"{host} takes the ports", timeout=0.5, start=mark)
                        break
                    except AssertionError:
                        continue
                assert tcp_from(net, net.wan, GW_WAN, 7005, b"") == f"local={host}\n"
            assert f"{second} takes the ports from {LAN_HOST}" in proc.output()
            assert proc.stop(signal.SIGTERM) == 0
        finally:
            proc.stop()
            proc.close()


def test_status_shows_live_nat_sessions_from_conntrack(tmp_path: Path) -> None:
    need_binary("conntrack", "conntrack")
    config = tmp_path / "gateway.toml"
    write_config(config)
    control = tmp_path / "ctl.sock"
    config.write_text(config.read_text().replace("enabled = false", f'socket = "{control}"'))
    with lab() as net:
        net.serve(net.lan, 9000, "sleep 30")
        env = {**os.environ, "PORTFWD_GATEWAY_CHECK": "0.3"}
        argv = ["ip", "netns", "exec", net.gw, sys.executable, "-m", "portfwd", "run", "-c", str(config)]
        proc = Proc(argv, env=env, cwd=REPO)
        try:
            proc.wait_for("nf_conntrack_timestamp")
            proc.wait_for(READY)
            client = Proc(["ip", "netns", "exec", net.wan, "socat", "-T", "30", "-", f"TCP4:{GW_WAN}:8000"])
            net.procs.append(client)
            deadline = time.monotonic() + 15
            rows: list[dict[str, object]] = []
            while not rows:
                assert time.monotonic() < deadline, "no NAT session in status"
                rows = status_rows(config, "gateway_sessions")
                time.sleep(0.1)
            (row,) = rows
            assert row["rule"] == "gateway.forward[1]"
            assert (row["proto"], row["public_port"], row["target"]) == ("tcp", 8000, f"{LAN_HOST}:9000")
            assert str(row["client"]).startswith(f"{WAN_HOST}:")
            assert isinstance(row["age"], int)
            table = subprocess.run(
                [sys.executable, "-m", "portfwd", "status", "-c", str(config)],
                capture_output=True, text=True, timeout=30, cwd=REPO,
            ).stdout  # fmt: skip
            assert "gateway NAT sessions (conntrack)" in table
            assert f"{LAN_HOST}:9000" in table
            assert proc.stop(signal.SIGTERM) == 0
            sysctl = net.run(net.gw, "sysctl", "-n", "net.netfilter.nf_conntrack_timestamp").stdout
            assert sysctl == b"0\n", "the setting portfwd turned on is restored on exit"
        finally:
            proc.stop()
            proc.close()


def test_forwarding_switches_warned_or_enabled(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    write_config(config)
    with lab() as net:
        net.serve(net.lan, 80, REPLY)
        net.run(net.gw, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        net.run(net.gw, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0")  # the lab has IPv6 off
        warned = portfwd(net, "gateway", "apply", "-c", str(config))
        assert warned.returncode == 0
        assert warned.stderr.decode().splitlines() == [
            "portfwd: warning: IPv4 forwarding is off: run sysctl -w net.ipv4.ip_forward=1, or set enable_forwarding = true",
            "portfwd: warning: IPv6 forwarding is off: run sysctl -w net.ipv6.conf.all.forwarding=1, or set enable_forwarding = true",
        ]
        assert tcp_from(net, net.wan, GW_WAN, 8080, b"x") == "", "the kernel does not route yet"
        config.write_text(
            config.read_text().replace('lan = "gwlan0"\n', 'lan = "gwlan0"\nenable_forwarding = true\n')
        )
        enabled = portfwd(net, "gateway", "apply", "-c", str(config))
        assert (enabled.returncode, enabled.stderr) == (0, b"")
        for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
            assert net.run(net.gw, "sysctl", "-n", key).stdout == b"1\n"
        assert tcp_from(net, net.wan, GW_WAN, 8080, b"x").startswith(f"peer={WAN_HOST}")
        assert portfwd(net, "gateway", "remove").returncode == 0
        for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):  # nothing left behind
            assert net.run(net.gw, "sysctl", "-n", key).stdout == b"0\n", key
