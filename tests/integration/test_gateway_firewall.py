"""A user's own forward chain that drops, in front of `portfwd gateway` and `portfwd run` (lan / gw / wan lab).

An accept in table inet portfwd cannot override a drop in another table's forward chain. These
tests load such a table in the gw namespace and check, through the real CLI, what portfwd says
(the exact lines), that the fix it prints works, that `open_other_tables = true` opens the chain
and that portfwd takes exactly its own accepts out again. Every check is made with real packets
between namespaces: sha256 of what crossed and the address the peer saw.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from tests.integration.processes import READY, REPO, Proc
from tests.integration.test_gateway import REPLY, portfwd, tables, tcp_from
from tests.integration.topology import GW_WAN, LAN_HOST, WAN_HOST, Lab, lab

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.netns]

#: What a user typically has: forward drops all but the replies.
USER_TABLE = """table inet filter {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
  }
}
"""
FIX_DNAT = "nft add rule inet filter forward ct status dnat accept"
FIX_MASQUERADE = 'nft add rule inet filter forward \'iifname "gwlan0" oifname "gwwan0" accept\''
OPT_IN = " (or set gateway.open_other_tables = true)"


def finding(what: str, fix: str) -> str:
    return (
        f"{what}: table inet filter chain forward drops it (policy drop), and an accept in "
        f"portfwd's table cannot override that; run: {fix}{OPT_IN}"
    )


#: One per forward and protocol (forward[0] is tcp+udp: two probes, worded alike), then masquerade.
FINDINGS = [
    finding("gateway.forward[0] (tcp)", FIX_DNAT),
    finding("gateway.forward[0] (udp)", FIX_DNAT),
    finding("gateway.forward[1]", FIX_DNAT),
    finding("masquerade", FIX_MASQUERADE),
]
OPENED = [
    "inet filter forward ct status dnat accept",
    'inet filter forward iifname "gwlan0" oifname "gwwan0" accept',
]


def write_config(path: Path, control: str = "enabled = false", extra: str = "") -> None:
    path.write_text(
        f'[control]\n{control}\n[gateway]\nwan = "gwwan0"\nlan = "gwlan0"\n{extra}'
        f'[[gateway.forward]]\nport = 8080\nto = "{LAN_HOST}:80"\nprotocol = "tcp+udp"\n'
        f'[[gateway.forward]]\nport = "8000-8001"\nto = "{LAN_HOST}:9000-9001"\n'
    )


def load_user_table(net: Lab, text: str = USER_TABLE) -> None:
    loaded = net.run(net.gw, "nft", "-f", "-", data=text.encode())
    assert loaded.returncode == 0, loaded.stderr


def user_table(net: Lab, family: str = "inet", name: str = "filter") -> str:
    listed = net.run(net.gw, "nft", "-a", "list", "table", family, name)
    assert listed.returncode == 0, listed.stderr
    return listed.stdout.decode()


def user_rules(net: Lab, family: str = "inet", name: str = "filter", chain: str = "forward") -> list[str]:
    """The chain's rules in order, without handles."""
    listed = net.run(net.gw, "nft", "list", "chain", family, name, chain)
    assert listed.returncode == 0, listed.stderr
    lines = [line.strip() for line in listed.stdout.decode().splitlines()]
    return [line for line in lines if line and not line.startswith(("table", "chain", "type", "}"))]


def same_handles(listing: str) -> str:
    """The listing without the table's own handle: the kernel numbers tables anew on each load."""
    return re.sub(r"^(table \S+ \S+ \{) # handle \d+$", r"\1", listing, count=1, flags=re.MULTILINE)


def serve_peers(net: Lab) -> None:
    net.serve(net.lan, 80, REPLY)
    net.serve(net.lan, 80, "cat", udp=True)
    net.serve(net.lan, 9001, "echo port=9001")
    net.serve(net.wan, 9000, "echo peer=$SOCAT_PEERADDR")


def assert_forwards_pass(net: Lab) -> None:
    """WAN -> LAN through each forward (the real client seen, sha256 intact) and LAN -> WAN masqueraded."""
    data = os.urandom(256 * 1024)
    assert tcp_from(net, net.wan, GW_WAN, 8080, data).splitlines() == [
        f"peer={WAN_HOST}",
        f"{hashlib.sha256(data).hexdigest()}  -",
    ]
    udp = net.run(net.wan, "socat", "-T", "3", "-", f"UDP4:{GW_WAN}:8080", data=b"datagram\n")
    assert udp.stdout == b"datagram\n"
    assert tcp_from(net, net.wan, GW_WAN, 8001, b"") == "port=9001\n"
    assert tcp_from(net, net.lan, WAN_HOST, 9000, b"") == f"peer={GW_WAN}\n", "masquerade"


def assert_forwards_blocked(net: Lab) -> None:
    assert tcp_from(net, net.wan, GW_WAN, 8080, b"x") == "", "the user's chain drops the forward"
    assert tcp_from(net, net.lan, WAN_HOST, 9000, b"") == "", "and the masqueraded traffic"


def run_portfwd(net: Lab, config: Path) -> Proc:
    argv = ["ip", "netns", "exec", net.gw, sys.executable, "-m", "portfwd", "run", "-c", str(config)]
    return Proc(argv, env={**os.environ, "PORTFWD_GATEWAY_CHECK": "0.3"}, cwd=REPO)


def test_apply_names_the_dropping_chain_and_its_fix_works(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    write_config(config)
    with lab() as net:
        serve_peers(net)
        load_user_table(net)
        try:
            plan = portfwd(net, "gateway", "plan", "-c", str(config))
            assert plan.returncode == 0, plan.stderr
            warnings = [line for line in plan.stdout.decode().splitlines() if line.startswith("# warning: ")]
            assert warnings == [f"# warning: {line}" for line in FINDINGS]

            applied = portfwd(net, "gateway", "apply", "-c", str(config))
            assert applied.returncode == 1, "applied, but it cannot carry anything"
            assert applied.stdout.decode() == "applied table inet portfwd: 2 forward rule(s)\n"
            assert applied.stderr.decode() == "".join(f"portfwd: error: {line}\n" for line in FINDINGS)
            assert "table inet portfwd" in tables(net), "applied all the same"
            assert_forwards_blocked(net)

            fixes = dict.fromkeys(line.split("; run: ", 1)[1].removesuffix(OPT_IN) for line in FINDINGS)
            assert list(fixes) == [FIX_DNAT, FIX_MASQUERADE]
            for command in fixes:  # as printed, through a shell, as a person would paste it
                ran = net.run(net.gw, "sh", "-c", command)
                assert ran.returncode == 0, ran.stderr
            assert_forwards_pass(net)
            again = portfwd(net, "gateway", "apply", "-c", str(config))
            assert (again.returncode, again.stderr) == (0, b""), "nothing left to report"
        finally:
            assert portfwd(net, "gateway", "remove", "-c", str(config)).returncode == 0
        assert "portfwd" not in tables(net)


def test_apply_with_the_opt_in_opens_the_chain_and_remove_takes_exactly_that_out(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    write_config(config, extra="open_other_tables = true\n")
    with lab() as net:
        serve_peers(net)
        load_user_table(net)
        before = user_table(net)
        try:
            applied = portfwd(net, "gateway", "apply", "-c", str(config))
            assert (applied.returncode, applied.stderr) == (0, b"")
            assert applied.stdout.decode().splitlines() == [
                "applied table inet portfwd: 2 forward rule(s)",
                *(f"opened: {line}" for line in OPENED),
            ]
            opened = user_table(net)
            assert opened.count('comment "portfwd gateway: ') == 2, opened
            assert_forwards_pass(net)
        finally:
            removed = portfwd(net, "gateway", "remove", "-c", str(config))
        assert removed.returncode == 0, removed.stderr
        assert removed.stdout.decode().startswith("removed table inet portfwd; cleared ")
        assert user_table(net) == before, "the user's table exactly as it was, handles and all"
        assert "portfwd" not in tables(net)
        assert_forwards_blocked(net)


def test_run_reports_a_drop_once_and_says_when_it_clears(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    write_config(config, control=f'socket = "{tmp_path / "ctl.sock"}"')
    with lab() as net:
        serve_peers(net)
        proc = run_portfwd(net, config)
        try:
            proc.wait_for(READY)
            assert "drops it" not in proc.output(), "no user table yet: nothing to report"
            assert "let the forwards through" not in proc.output()
            mark = proc.mark()
            load_user_table(net)
            proc.wait_for(f"ERROR gateway: {FINDINGS[-1]}", start=mark)
            # A drift makes the service go round its loop again with the user's table still
            # loaded: it checks the other tables before it sees its own table gone.
            net.run(net.gw, "nft", "delete", "table", "inet", "portfwd")
            proc.wait_for("table inet portfwd applied again", start=mark)
            assert_forwards_blocked(net)
            net.run(net.gw, "nft", "delete", "table", "inet", "filter")
            clear = proc.wait_for(
                "gateway: the other tables' forward chains let the forwards through now", start=mark
            )
            lines = proc.lines[mark : proc.lines.index(clear)]
            reported = [line.split(" ERROR gateway: ", 1)[1] for line in lines if " ERROR gateway: " in line]
            assert reported == FINDINGS, "each finding logged once, at ERROR, for all the checks it held"
            assert_forwards_pass(net)
            assert proc.stop(signal.SIGTERM) == 0
            assert "accept(s) it added to other tables" not in proc.output(), (
                "nothing opened without the opt-in"
            )
        finally:
            proc.stop()
            proc.close()
        assert "portfwd" not in tables(net)


def test_run_with_the_opt_in_opens_a_table_loaded_later_and_closes_it_at_exit(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    write_config(config, control=f'socket = "{tmp_path / "ctl.sock"}"', extra="open_other_tables = true\n")
    with lab() as net:
        serve_peers(net)
        load_user_table(net)  # once before portfwd runs, to see what the user's table alone looks like
        loaded = same_handles(user_table(net))
        net.run(net.gw, "nft", "delete", "table", "inet", "filter")
        proc = run_portfwd(net, config)
        try:
            proc.wait_for(READY)
            mark = proc.mark()
            load_user_table(net)
            for line in OPENED:
                proc.wait_for(f"INFO gateway: opened {line}", start=mark)
            assert_forwards_pass(net)
            assert " ERROR " not in proc.output(), "opened, so nothing to report"
            assert proc.stop(signal.SIGTERM) == 0
            proc.wait_for("gateway: removed the 2 accept(s) it added to other tables", start=mark)
        finally:
            proc.stop()
            proc.close()
        assert same_handles(user_table(net)) == loaded, "the user's table is back to what the user loaded"
        assert "portfwd" not in tables(net)


#: What iptables-nft creates for `iptables -P FORWARD DROP` (docker does this), written with nft:
#: its table and chain names are what mark it as iptables', so portfwd must not put a rule there
#: that iptables cannot list (`ct status dnat`).
IPTABLES_TABLE = """table ip filter {
  chain FORWARD {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
  }
}
"""
TRIGGER = '[[gateway.trigger]]\ntrigger = "tcp/6667"\nopen = ["tcp/7000-7010"]\n'
IPTABLES_TRIGGER_FIX = "iptables -A FORWARD -m conntrack --ctstate DNAT -j ACCEPT"


def test_an_iptables_table_gets_only_rules_iptables_can_read(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    write_config(config, extra="open_other_tables = true\n")
    config.write_text(config.read_text() + TRIGGER)
    with lab() as net:
        serve_peers(net)
        load_user_table(net, IPTABLES_TABLE)
        before = user_table(net, "ip", "filter")
        try:
            applied = portfwd(net, "gateway", "apply", "-c", str(config))
            assert applied.returncode == 1, "the trigger's ports cannot be opened with a native rule"
            out = applied.stdout.decode().splitlines()
            for opened in (
                'opened: ip filter FORWARD iifname "gwwan0" oifname "gwlan0" ip daddr 192.168.77.10 tcp dport 80 accept',
                'opened: ip filter FORWARD iifname "gwwan0" oifname "gwlan0" ip daddr 192.168.77.10 udp dport 80 accept',
                'opened: ip filter FORWARD iifname "gwwan0" oifname "gwlan0" ip daddr 192.168.77.10 tcp dport 9000-9001 accept',
                'opened: ip filter FORWARD iifname "gwlan0" oifname "gwwan0" accept',
            ):
                assert opened in out, out
            assert "ct status" not in user_table(net, "ip", "filter"), "iptables could not list the table"
            assert applied.stderr.decode() == (
                "portfwd: error: gateway.trigger[0]: table ip filter chain FORWARD drops it (policy drop), and an "
                f"accept in portfwd's table cannot override that; run: {IPTABLES_TRIGGER_FIX}\n"
            )
            assert_forwards_pass(net)
        finally:
            removed = portfwd(net, "gateway", "remove", "-c", str(config))
        assert removed.returncode == 0, removed.stderr
        assert user_table(net, "ip", "filter") == before
        assert "portfwd" not in tables(net)


def test_a_fix_portfwd_cannot_make_is_not_reported_as_opened(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[control]\nenabled = false\n[gateway]\nwan = "gwwan0"\nlan = "gwlan0"\nmasquerade = false\n'
        "open_other_tables = true\n" + TRIGGER
    )
    with lab() as net:
        load_user_table(net, IPTABLES_TABLE)
        try:
            applied = portfwd(net, "gateway", "apply", "-c", str(config))
            assert applied.returncode == 1
            assert applied.stdout.decode() == "applied table inet portfwd: 0 forward rule(s)\n", (
                "nothing was opened, so no `opened:` line"
            )
        finally:
            assert portfwd(net, "gateway", "remove", "-c", str(config)).returncode == 0


#: A blocklist in front of the policy drop: the admin's own decision about some WAN clients.
BLOCKED_CLIENT = "203.0.113.21"
BLOCKLIST_TABLE = f"""table inet filter {{
  set blocklist {{ type ipv4_addr; elements = {{ {BLOCKED_CLIENT} }} }}
  chain forward {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    ip saddr @blocklist drop
  }}
}}
"""
BLOCKLIST_RULE = "ip saddr @blocklist drop"


def blocklist_warning(what: str, handle: int, fix: str) -> str:
    return (
        f"portfwd: warning: {what}: table inet filter chain forward may drop it (rule {handle}: "
        f"{BLOCKLIST_RULE}), and an accept in portfwd's table cannot override that; run: {fix}\n"
    )


def test_a_policy_drop_is_opened_at_the_end_and_the_blocklist_still_applies(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    write_config(config, extra="open_other_tables = true\n")
    with lab() as net:
        serve_peers(net)
        added = net.run(net.wan, "ip", "addr", "add", f"{BLOCKED_CLIENT}/24", "dev", "wan0")
        assert added.returncode == 0, added.stderr
        load_user_table(net, BLOCKLIST_TABLE)
        handle = int(re.findall(r"@blocklist drop # handle (\d+)", user_table(net))[0])
        try:
            applied = portfwd(net, "gateway", "apply", "-c", str(config))
            assert applied.returncode == 0, "what is left may drop: warnings"
            assert applied.stdout.decode().splitlines() == [
                "applied table inet portfwd: 2 forward rule(s)",
                *(f"opened: {line}" for line in OPENED),
            ]
            assert user_rules(net) == [
                "ct state established,related accept",
                BLOCKLIST_RULE,
                'ct status dnat accept comment "portfwd gateway: gateway.forward[0] (tcp) and 2 more"',
                'iifname "gwlan0" oifname "gwwan0" accept comment "portfwd gateway: masquerade"',
            ], "appended: the user's rules run first"
            insert = f"nft insert rule inet filter forward position {handle}"
            assert applied.stderr.decode() == "".join(
                blocklist_warning(what, handle, f"{insert} {fix}")
                for what, fix in (
                    ("gateway.forward[0] (tcp)", "ct status dnat accept"),
                    ("gateway.forward[0] (udp)", "ct status dnat accept"),
                    ("gateway.forward[1]", "ct status dnat accept"),
                    ("masquerade", '\'iifname "gwlan0" oifname "gwwan0" accept\''),
                )
            ), "the admin's drop rule is reported, not opened"
            assert_forwards_pass(net)  # from 203.0.113.20: not on the list
            blocked = net.run(
                net.wan, "socat", "-t", "5", "-T", "10", "-",
                f"TCP4:{GW_WAN}:8080,connect-timeout=2,bind={BLOCKED_CLIENT}", data=b"x",
            )  # fmt: skip
            assert blocked.stdout == b"", "the blocklisted WAN client is still dropped"
            assert_forwards_pass(net)  # and the others still pass after it tried
        finally:
            removed = portfwd(net, "gateway", "remove", "-c", str(config))
        assert removed.returncode == 0, removed.stderr
        assert user_rules(net) == ["ct state established,related accept", BLOCKLIST_RULE]


def test_a_blocklist_under_policy_accept_is_reported_and_never_opened(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    write_config(config, extra="open_other_tables = true\n")
    table = BLOCKLIST_TABLE.replace("policy drop;", "policy accept;").replace(
        "    ct state established,related accept\n", ""
    )
    with lab() as net:
        serve_peers(net)
        load_user_table(net, table)
        before = user_table(net)
        handle = int(re.findall(r"@blocklist drop # handle (\d+)", before)[0])
        try:
            applied = portfwd(net, "gateway", "apply", "-c", str(config))
            assert applied.returncode == 0
            assert applied.stdout.decode() == "applied table inet portfwd: 2 forward rule(s)\n", (
                "nothing opened"
            )
            insert = f"nft insert rule inet filter forward position {handle}"
            assert applied.stderr.decode() == "".join(
                blocklist_warning(what, handle, f"{insert} {fix}")
                for what, fix in (
                    ("gateway.forward[0] (tcp)", "ct status dnat accept"),
                    ("gateway.forward[0] (udp)", "ct status dnat accept"),
                    ("gateway.forward[1]", "ct status dnat accept"),
                    ("masquerade", '\'iifname "gwlan0" oifname "gwwan0" accept\''),
                    ("masquerade (replies)", "ct state established,related accept"),
                )
            )  # a forward's replies come from the LAN host, never on a list of WAN clients
            assert user_table(net) == before
            assert_forwards_pass(net)
        finally:
            assert portfwd(net, "gateway", "remove", "-c", str(config)).returncode == 0
        assert user_table(net) == before


#: A policy drop with no accept for replies at all: the first packets alone are not enough.
NO_REPLIES_TABLE = USER_TABLE.replace("    ct state established,related accept\n", "")


def test_a_policy_drop_without_an_established_accept_is_opened_both_ways(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    write_config(config)
    with lab() as net:
        serve_peers(net)
        load_user_table(net, NO_REPLIES_TABLE)
        try:
            plan = portfwd(net, "gateway", "plan", "-c", str(config))
            warnings = [line for line in plan.stdout.decode().splitlines() if line.startswith("# warning: ")]
            replies = "nft add rule inet filter forward ct state established,related accept"
            assert warnings == [
                f"# warning: {line}"
                for line in (
                    finding("gateway.forward[0] (tcp)", FIX_DNAT),
                    finding("gateway.forward[0] (udp)", FIX_DNAT),
                    finding("gateway.forward[0] (replies)", replies),  # tcp and udp: one line
                    finding("gateway.forward[1]", FIX_DNAT),
                    finding("gateway.forward[1] (replies)", replies),
                    finding("masquerade", FIX_MASQUERADE),
                    finding("masquerade (replies)", replies),
                )
            ]
            write_config(config, extra="open_other_tables = true\n")
            applied = portfwd(net, "gateway", "apply", "-c", str(config))
            assert (applied.returncode, applied.stderr) == (0, b"")
            assert applied.stdout.decode().splitlines() == [
                "applied table inet portfwd: 2 forward rule(s)",
                f"opened: {OPENED[0]}",
                "opened: inet filter forward ct state established,related accept",
                f"opened: {OPENED[1]}",
            ]
            assert_forwards_pass(net)  # sha256 of 256 KiB back through the forward: the replies pass
        finally:
            assert portfwd(net, "gateway", "remove", "-c", str(config)).returncode == 0
        assert user_rules(net) == []


#: docker's FORWARD (`iptables -P FORWARD DROP`) before any established accept is in it.
DOCKER_TABLE = IPTABLES_TABLE.replace("    ct state established,related accept\n", "")


def test_a_docker_like_chain_without_an_established_accept_is_fully_opened(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    write_config(config, extra="open_other_tables = true\nmasquerade = false\n")
    with lab() as net:
        serve_peers(net)
        load_user_table(net, DOCKER_TABLE)
        before = user_table(net, "ip", "filter")
        try:
            applied = portfwd(net, "gateway", "apply", "-c", str(config))
            assert (applied.returncode, applied.stderr) == (0, b""), "fully opened"
            assert applied.stdout.decode().splitlines() == [
                "applied table inet portfwd: 2 forward rule(s)",
                *(
                    f"opened: ip filter FORWARD {rule} accept"
                    for rule in (
                        'iifname "gwwan0" oifname "gwlan0" ip daddr 192.168.77.10 tcp dport 80',
                        'iifname "gwwan0" oifname "gwlan0" ip daddr 192.168.77.10 udp dport 80',
                        # replies by their source, not `ct state`: iptables-nft must still read the table
                        'iifname "gwlan0" oifname "gwwan0" ip saddr 192.168.77.10 tcp sport 80',
                        'iifname "gwlan0" oifname "gwwan0" ip saddr 192.168.77.10 udp sport 80',
                        'iifname "gwwan0" oifname "gwlan0" ip daddr 192.168.77.10 tcp dport 9000-9001',
                        'iifname "gwlan0" oifname "gwwan0" ip saddr 192.168.77.10 tcp sport 9000-9001',
                    )
                ),
            ]
            assert "ct " not in user_table(net, "ip", "filter")
            data = os.urandom(256 * 1024)
            assert tcp_from(net, net.wan, GW_WAN, 8080, data).splitlines() == [
                f"peer={WAN_HOST}",
                f"{hashlib.sha256(data).hexdigest()}  -",
            ]
            udp = net.run(net.wan, "socat", "-T", "3", "-", f"UDP4:{GW_WAN}:8080", data=b"datagram\n")
            assert udp.stdout == b"datagram\n"
            assert tcp_from(net, net.wan, GW_WAN, 8001, b"") == "port=9001\n"
        finally:
            assert portfwd(net, "gateway", "remove", "-c", str(config)).returncode == 0
        assert user_table(net, "ip", "filter") == before
