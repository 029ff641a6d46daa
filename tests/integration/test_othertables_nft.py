"""portfwd.kernel.othertables and openings against real nft: find the drop, open it, close it, user rules untouched.

Every nft call runs inside a throwaway network namespace (`ip netns exec`); the host's ruleset is
never read or changed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from portfwd.kernel.openings import closing, fix, opened, opening
from portfwd.kernel.othertables import Probe, blocked
from tests.conftest import need, need_root
from tests.integration.topology import GW_WAN, LAN_HOST, lab

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.netns]

USER_FIREWALL = """
table inet filter {
  set trusted { type ipv4_addr; flags interval; elements = { 10.9.0.0/16 } }
  chain lan_out {
    ip daddr 192.0.2.0/24 drop
  }
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ct state invalid drop
    iifname "lan" jump lan_out
    ip saddr @trusted accept comment "the user's own"
  }
}
table ip legacy {
  chain FORWARD {
    type filter hook forward priority 0; policy drop;
    ct state established,related counter accept
  }
}
table inet portfwd {
  chain forward {
    type filter hook forward priority filter; policy accept;
    ct status dnat accept
  }
}
"""

PROBES = [
    Probe("gateway.forward[0]", "ip", "wan", "lan", "tcp", "192.168.77.10", (80, 80), True),
    Probe("gateway.forward[1]", "ip", "wan", "lan", "udp", "192.168.77.10", (9000, 9001), True),
    Probe("masquerade", "ip", "lan", "wan", None, None, None, False),
    Probe("gateway.forward[2] (IPv6 pinhole)", "ip6", "wan", "lan", "tcp", "2001:db8::10", (443, 443), False),
]


@contextlib.contextmanager
def netns() -> Iterator[str]:
    need_root()
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        need(shutil.which(tool) is not None, f"needs {tool} (apt-get install {package})")
    name = f"pft-ot-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=30)


def nft(ns: str, *args: str, batch: str | None = None) -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", *args], input=batch, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, f"nft {' '.join(args)}: {result.stderr}\n{batch or ''}"
    return result.stdout


def ruleset(ns: str) -> dict[str, Any]:
    listing: dict[str, Any] = json.loads(nft(ns, "-j", "list", "ruleset"))
    return listing


def test_find_open_and_close_in_a_real_ruleset() -> None:
    with netns() as ns:
        nft(ns, "-f", "-", batch=USER_FIREWALL)
        before = ruleset(ns)
        before_text = nft(ns, "-a", "list", "ruleset")

        found = blocked(before, PROBES)
        assert [(b.probe.what, b.family, b.table, b.chain, b.certain, b.because) for b in found] == [
            ("gateway.forward[0]", "inet", "filter", "forward", False, "policy drop"),
            ("gateway.forward[0]", "ip", "legacy", "FORWARD", True, "policy drop"),
            ("gateway.forward[1]", "inet", "filter", "forward", False, "policy drop"),
            ("gateway.forward[1]", "ip", "legacy", "FORWARD", True, "policy drop"),
            ("masquerade", "inet", "filter", "forward", False, "policy drop"),
            ("masquerade", "ip", "legacy", "FORWARD", True, "policy drop"),
            ("gateway.forward[2] (IPv6 pinhole)", "inet", "filter", "forward", True, "policy drop"),
        ]  # uncertain in inet filter for IPv4: `ip saddr @trusted accept` may let some clients in
        assert fix(found[0]) == "nft add rule inet filter forward ct status dnat accept"

        # each suggested command works as printed (minus the shell's quoting) and clears its finding
        with netns() as scratch:
            nft(scratch, "-f", "-", batch=USER_FIREWALL)
            for item in found:
                command = fix(item).removeprefix("nft ").replace("'", "")
                nft(scratch, command)
            left = blocked(ruleset(scratch), PROBES)
            # appended, so the user's rules still come first: `ip daddr 192.0.2.0/24 drop` in
            # lan_out still applies to what the LAN sends out
            assert [(b.probe.what, b.chain, b.certain, b.because) for b in left] == [
                ("masquerade", "forward", False, "rule 4 in chain lan_out: ip daddr 192.0.2.0/24 drop")
            ]
            assert fix(left[0]) == (
                'nft insert rule inet filter lan_out position 4 \'iifname "lan" oifname "wan" accept\''
            )

        batch = opening(found)
        # only the certain policy drops, appended; the two DNAT probes share one rule per chain
        assert batch.count("add rule") == 3
        assert "insert" not in batch
        nft(ns, "-f", "-", batch=batch)
        during = ruleset(ns)
        assert [(b.probe.what, b.table, b.certain) for b in blocked(during, PROBES)] == [
            ("gateway.forward[0]", "filter", False),
            ("gateway.forward[1]", "filter", False),
            ("masquerade", "filter", False),
        ], "the uncertain ones are the user's to decide"
        inserted = opened(during)
        assert len(inserted) == 3
        assert {(family, table) for family, table, _, _ in inserted} == {("inet", "filter"), ("ip", "legacy")}
        listed = nft(ns, "-a", "list", "chain", "ip", "legacy", "FORWARD").splitlines()
        assert "counter" in listed[3], "the user's rule first"
        assert "portfwd gateway" in listed[-3], "portfwd's after it"

        nft(ns, "-f", "-", batch=closing(inserted))
        assert ruleset(ns) == before
        assert nft(ns, "-a", "list", "ruleset") == before_text
        assert opened(ruleset(ns)) == []


PORTFWD_TABLE = f"""
table inet portfwd {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "gwwan0" tcp dport 8080 dnat ip to {LAN_HOST}:80
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ct status dnat accept
  }}
}}
table inet filter {{
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
  }}
}}
"""


def test_real_packets_pass_only_while_opened() -> None:
    """portfwd's own accept is not enough; the inserted rule lets a real connection through."""
    with lab() as net:
        net.serve(net.lan, 80, "echo reached")

        def connect() -> str:
            result = net.run(
                net.wan, "socat", "-t", "2", "-T", "4", "-", f"TCP4:{GW_WAN}:8080,connect-timeout=2"
            )
            return result.stdout.decode(errors="replace").strip()

        def gw_nft(*args: str, batch: str | None = None) -> str:
            result = net.run(net.gw, "nft", *args, data=(batch or "").encode())
            assert result.returncode == 0, result.stderr.decode()
            return result.stdout.decode()

        gw_nft("-f", "-", batch=PORTFWD_TABLE)
        assert connect() == "", "the other table's policy drop wins over portfwd's accept"

        probe = Probe("gateway.forward[0]", "ip", "gwwan0", "gwlan0", "tcp", LAN_HOST, (80, 80), True)
        found = blocked(json.loads(gw_nft("-j", "list", "ruleset")), [probe])
        assert [(b.table, b.certain) for b in found] == [("filter", True)]

        gw_nft("-f", "-", batch=opening(found))
        assert connect() == "reached"

        gw_nft("-f", "-", batch=closing(opened(json.loads(gw_nft("-j", "list", "ruleset")))))
        assert connect() == ""
