"""The gateway under change, in the lan / gw / wan lab: a renumbered WAN, IPv6, the router's own
access, triggers in hairpin, and a removal that leaves no translated flow behind (#23).

Real packets between namespaces; what crossed is checked by the address the peer saw and by
sha256; conntrack's table is read with the conntrack tool.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import need_binary
from tests.integration.netns import wait_listening_in
from tests.integration.processes import READY, REPO, Proc
from tests.integration.test_gateway import REPLY, portfwd, tables, tcp_from
from tests.integration.topology import (
    GW_LAN,
    GW_WAN,
    LAN_HOST,
    LAN_HOST6,
    WAN_HOST,
    WAN_HOST6,
    Lab,
    lab,
)

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.netns]

BASE = '[control]\nenabled = false\n[gateway]\nwan = "gwwan0"\nlan = "gwlan0"\n'


def tcp6_from(net: Lab, ns: str, host: str, port: int, data: bytes = b"") -> str:
    result = net.run(
        ns, "socat", "-t", "5", "-T", "10", "-", f"TCP6:[{host}]:{port},connect-timeout=2", data=data
    )
    return result.stdout.decode(errors="replace")


def serve6(net: Lab, ns: str, port: int, command: str) -> None:
    proc = Proc(
        ["ip", "netns", "exec", ns, "socat", f"TCP6-LISTEN:{port},fork,reuseaddr", f"SYSTEM:{command}"]
    )
    net.procs.append(proc)
    wait_listening_in(ns, port)


def run_portfwd(net: Lab, config: Path, env: dict[str, str] | None = None) -> Proc:
    argv = ["ip", "netns", "exec", net.gw, sys.executable, "-m", "portfwd", "run", "-c", str(config)]
    proc = Proc(argv, env={**os.environ, **(env or {})}, cwd=REPO)
    proc.wait_for(READY)
    return proc


def test_a_renumbered_wan_keeps_forwards_hairpin_and_the_routers_own_access(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        BASE.replace("enabled = false", f'socket = "{tmp_path / "ctl.sock"}"')
        + f'[[gateway.forward]]\nport = 8080\nto = "{LAN_HOST}:80"\n'
    )
    data = os.urandom(256 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    with lab() as net:
        net.serve(net.lan, 80, REPLY)
        # The periodic check is slowed to a minute: only `ip monitor` can notice the change in time.
        proc = run_portfwd(net, config, {"PORTFWD_GATEWAY_CHECK": "60"})
        try:
            for public in (GW_WAN, "203.0.113.9"):
                assert tcp_from(net, net.wan, public, 8080, data).splitlines() == [
                    f"peer={WAN_HOST}",
                    f"{digest}  -",
                ], f"WAN -> {public}"
                assert tcp_from(net, net.lan, public, 8080, b"x").startswith(f"peer={GW_LAN}\n"), (
                    f"hairpin to {public}, masqueraded so the reply comes back the same way"
                )
                assert tcp_from(net, net.gw, public, 8080, b"x").startswith(f"peer={public}\n"), (
                    f"the router itself reaches its forward at {public}"
                )
                if public == GW_WAN:
                    mark = proc.mark()
                    net.run(net.gw, "ip", "addr", "del", f"{GW_WAN}/24", "dev", "gwwan0")
                    net.run(net.gw, "ip", "addr", "add", "203.0.113.9/24", "dev", "gwwan0")
                    proc.wait_for(
                        "gwwan0 addresses now 203.0.113.9 (were 203.0.113.1)", start=mark
                    )  # one line
            assert "behind our back" not in proc.output(), "nothing was re-applied: the rules hold no address"
            # Transit traffic that only passes the WAN interface is not the gateway's to translate.
            net.run(net.wan, "ip", "route", "add", "198.51.100.0/24", "via", "203.0.113.9")
            assert tcp_from(net, net.wan, "198.51.100.77", 8080, b"x") == "", "not DNATed to the LAN host"
            assert proc.stop(signal.SIGTERM) == 0
        finally:
            proc.stop()
            proc.close()


def test_ipv6_inbound_is_dropped_but_for_replies_and_pinholes(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        BASE
        + "enable_forwarding = true\n"
        + f'[[gateway.forward]]\nport = 8080\nto = "{LAN_HOST}:80"\n'
        + f'[[gateway.forward]]\nport = 443\nto = "[{LAN_HOST6}]:443"\n'
    )
    with lab(ipv6=True) as net:
        serve6(net, net.lan, 22, "echo ssh")
        serve6(net, net.lan, 443, "echo peer=$SOCAT_PEERADDR")
        serve6(net, net.wan, 9000, "echo outside")
        net.run(net.gw, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        assert tcp6_from(net, net.wan, LAN_HOST6, 22) == "ssh\n", "the hole the firewall closes"
        applied = portfwd(net, "gateway", "apply", "-c", str(config))
        assert applied.returncode == 0, applied.stderr
        try:
            assert tcp6_from(net, net.wan, LAN_HOST6, 22) == "", "unsolicited inbound IPv6 dropped"
            assert (
                tcp6_from(net, net.wan, LAN_HOST6, 443)
                == f"peer=[{ipaddress.ip_address(WAN_HOST6).exploded}]\n"
            ), "a pinhole: opened, not translated"
            assert tcp6_from(net, net.lan, WAN_HOST6, 9000) == "outside\n", "replies to the LAN's own get in"
            ping = net.run(net.wan, "ping", "-6", "-c", "1", "-W", "2", LAN_HOST6)
            assert ping.returncode == 0, "echo requests pass, as RFC 4890 asks"
        finally:
            assert portfwd(net, "gateway", "remove").returncode == 0
        assert tcp6_from(net, net.wan, LAN_HOST6, 22) == "ssh\n", "removed: as before"


def test_trigger_ports_work_in_hairpin(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        BASE + '[[gateway.trigger]]\ntrigger = "tcp/6667"\nopen = ["tcp/7000-7010"]\nidle_timeout = "30s"\n'
    )
    with lab() as net:
        net.serve(net.lan, 7005, "echo peer=$SOCAT_PEERADDR")
        net.serve(net.wan, 6667, "echo irc")
        assert portfwd(net, "gateway", "apply", "-c", str(config)).returncode == 0
        try:
            assert tcp_from(net, net.lan, WAN_HOST, 6667, b"") == "irc\n", "the LAN host triggers"
            assert tcp_from(net, net.wan, GW_WAN, 7005, b"") == f"peer={WAN_HOST}\n"
            assert tcp_from(net, net.lan, GW_WAN, 7005, b"") == f"peer={GW_LAN}\n", (
                "and through the public address"
            )
        finally:
            portfwd(net, "gateway", "remove")


def conntrack_lines(net: Lab, *args: str) -> list[str]:
    out = net.run(net.gw, "conntrack", "-L", *args).stdout.decode()
    return [line for line in out.splitlines() if line.strip()]


def test_removal_clears_translated_flows_and_a_crash_keeps_the_timestamp_setting(tmp_path: Path) -> None:
    need_binary("conntrack", "conntrack")
    config = tmp_path / "gateway.toml"
    config.write_text(
        BASE.replace("enabled = false", f'socket = "{tmp_path / "ctl.sock"}"')
        + f'[[gateway.forward]]\nport = 8080\nto = "{LAN_HOST}:80"\nprotocol = "tcp+udp"\n'
    )
    state = tmp_path / "state"
    env = {"PORTFWD_STATE_DIR": str(state), "PORTFWD_GATEWAY_CHECK": "60"}
    with lab() as net:
        net.serve(net.lan, 80, "sleep 30")
        net.serve(net.lan, 80, "cat", udp=True)
        net.serve(net.wan, 9000, "cat", udp=True)

        def flows() -> None:
            held = Proc(["ip", "netns", "exec", net.wan, "socat", "-T", "30", "-", f"TCP4:{GW_WAN}:8080"])
            net.procs.append(held)
            udp = net.run(net.wan, "socat", "-T", "2", "-", f"UDP4:{GW_WAN}:8080", data=b"in\n")
            assert udp.stdout == b"in\n"
            out = net.run(net.lan, "socat", "-T", "2", "-", f"UDP4:{WAN_HOST}:9000", data=b"out\n")
            assert out.stdout == b"out\n"
            for _ in range(100):  # bounded: until the held TCP connection is tracked as established
                if any(
                    "ESTABLISHED" in line for line in conntrack_lines(net, "-p", "tcp", "--dport", "8080")
                ):
                    break
                net.run(net.gw, "sleep", "0.05")
            assert conntrack_lines(net, "-p", "tcp", "--dport", "8080", "--dst-nat")
            assert conntrack_lines(net, "-p", "udp", "--dport", "8080", "--dst-nat")
            assert conntrack_lines(net, "-p", "udp", "--dport", "9000", "--src-nat")

        # A DNAT of someone else's on the same box: its flow is not the gateway's to clear.
        other = "table ip other {\n chain pre {\n  type nat hook prerouting priority -110;\n  udp dport 7070 dnat to 192.168.77.10:80\n }\n}\n"
        assert net.run(net.gw, "nft", "-f", "-", data=other.encode()).returncode == 0
        theirs = net.run(net.wan, "socat", "-T", "2", "-", f"UDP4:{GW_WAN}:7070", data=b"theirs\n")
        assert theirs.stdout == b"theirs\n"

        # One-shot apply and remove.
        assert portfwd(net, "gateway", "apply", "-c", str(config)).returncode == 0
        flows()
        removed = portfwd(net, "gateway", "remove", "-c", str(config))
        assert removed.returncode == 0, removed.stderr
        assert removed.stdout.decode().startswith("removed table inet portfwd; cleared ")
        left = conntrack_lines(net, "--dst-nat")
        assert [line for line in left if "dport=7070" not in line] == [], "no DNATed flow of the gateway left"
        assert any("dport=7070" in line for line in left), "the other table's flow is untouched"
        assert conntrack_lines(net, "--src-nat") == [], "no masqueraded flow left"
        net.run(net.gw, "nft", "delete", "table", "ip", "other")

        # `run` with the timestamp setting off; killed, started again, then stopped cleanly.
        net.run(net.gw, "sysctl", "-qw", "net.netfilter.nf_conntrack_timestamp=0")
        stamp = ("sysctl", "-n", "net.netfilter.nf_conntrack_timestamp")
        first = run_portfwd(net, config, env)
        try:
            assert net.run(net.gw, *stamp).stdout == b"1\n"
            assert (state / "conntrack-timestamp").read_text() == "0\n", "the value found, kept on disk"
            first.stop(signal.SIGKILL)
        finally:
            first.stop()
            first.close()
        second = run_portfwd(net, config, env)
        try:
            assert (state / "conntrack-timestamp").read_text() == "0\n", "not overwritten by portfwd's own 1"
            flows()
            assert second.stop(signal.SIGTERM) == 0
            assert "translated flow(s) cleared" in second.output()
        finally:
            second.stop()
            second.close()
        assert net.run(net.gw, *stamp).stdout == b"0\n", "the value before the crash, restored"
        assert not (state / "conntrack-timestamp").exists()
        assert "portfwd" not in tables(net)
        assert [line for line in conntrack_lines(net, "--dst-nat") if "dport=7070" not in line] == []
        assert conntrack_lines(net, "--src-nat") == []


def test_a_flowtable_is_used_where_the_kernel_has_them_and_one_line_where_not(tmp_path: Path) -> None:
    from portfwd.kernel.nft import flowtables_supported

    config = tmp_path / "gateway.toml"
    config.write_text(BASE + f'flowtable = true\n[[gateway.forward]]\nport = 8080\nto = "{LAN_HOST}:80"\n')
    supported = flowtables_supported()  # this machine's kernel has none; another's may
    line = (
        ""
        if supported
        else "portfwd: warning: gateway.flowtable: this kernel has no nftables flowtables "
        "(CONFIG_NF_FLOW_TABLE); established flows take the normal forward path\n"
    )
    with lab() as net:
        net.serve(net.lan, 80, REPLY)
        checked = portfwd(net, "check", "-c", str(config))
        assert (checked.returncode, checked.stderr.decode()) == (0, line)
        applied = portfwd(net, "gateway", "apply", "-c", str(config))
        try:
            assert (applied.returncode, applied.stderr.decode()) == (0, line)
            assert (
                "flow add @fastpath"
                in net.run(net.gw, "nft", "list", "table", "inet", "portfwd").stdout.decode()
            ) == supported
            assert tcp_from(net, net.wan, GW_WAN, 8080, b"x").startswith(f"peer={WAN_HOST}")
        finally:
            assert portfwd(net, "gateway", "remove").returncode == 0
