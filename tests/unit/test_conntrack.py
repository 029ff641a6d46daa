"""conntrack's XML listing (as conntrack-tools 1.4.7 prints it) to NAT session rows."""

from __future__ import annotations

from portfwd.kernel.conntrack import Claim, parse

LISTING = """<?xml version="1.0" encoding="utf-8"?>
<conntrack>
<flow><meta direction="original"><layer3 protonum="2" protoname="ipv4"><src>203.0.113.20</src><dst>203.0.113.1</dst></layer3><layer4 protonum="17" protoname="udp"><sport>38719</sport><dport>8080</dport></layer4></meta><meta direction="reply"><layer3 protonum="2" protoname="ipv4"><src>192.168.77.10</src><dst>203.0.113.20</dst></layer3><layer4 protonum="17" protoname="udp"><sport>80</sport><dport>38719</dport></layer4></meta><meta direction="independent"><timeout>28</timeout><mark>0</mark><use>1</use><id>1953829063</id><unreplied/><deltatime>1</deltatime></meta></flow>
<flow><meta direction="original"><layer3 protonum="2" protoname="ipv4"><src>203.0.113.20</src><dst>203.0.113.1</dst></layer3><layer4 protonum="6" protoname="tcp"><sport>49478</sport><dport>8001</dport></layer4></meta><meta direction="reply"><layer3 protonum="2" protoname="ipv4"><src>192.168.77.10</src><dst>203.0.113.20</dst></layer3><layer4 protonum="6" protoname="tcp"><sport>9001</sport><dport>49478</dport></layer4></meta><meta direction="independent"><state>ESTABLISHED</state><timeout>118</timeout><mark>0</mark><use>1</use><id>2147508418</id><assured/><deltatime>7</deltatime></meta></flow>
<flow><meta direction="original"><layer3 protonum="2" protoname="ipv4"><src>203.0.113.20</src><dst>203.0.113.1</dst></layer3><layer4 protonum="6" protoname="tcp"><sport>1</sport><dport>22</dport></layer4></meta><meta direction="reply"><layer3 protonum="2" protoname="ipv4"><src>192.168.77.9</src><dst>203.0.113.20</dst></layer3><layer4 protonum="6" protoname="tcp"><sport>22</sport><dport>1</dport></layer4></meta><meta direction="independent"><state>SYN_SENT</state></meta></flow>
</conntrack>
"""
CLAIMS = [Claim("web", "udp", 8080, 8080), Claim("gateway.forward[1]", "tcp", 8000, 8001)]


def test_flows_become_rows_per_rule() -> None:
    assert parse(LISTING, CLAIMS) == [
        {"rule": "web", "proto": "udp", "client": "203.0.113.20:38719", "public_port": 8080,
         "target": "192.168.77.10:80", "state": "UNREPLIED", "age": 1,
         "original": ("udp", "203.0.113.20", "203.0.113.1", 38719, 8080), "reply": ("192.168.77.10", 80)},
        {"rule": "gateway.forward[1]", "proto": "tcp", "client": "203.0.113.20:49478", "public_port": 8001,
         "target": "192.168.77.10:9001", "state": "ESTABLISHED", "age": 7,
         "original": ("tcp", "203.0.113.20", "203.0.113.1", 49478, 8001), "reply": ("192.168.77.10", 9001)},
    ]  # fmt: skip


def test_a_claim_with_a_target_owns_only_the_flows_that_target_answers() -> None:
    """Another DNAT on the same port (docker's, another instance's) is not a rule's flow: it is
    neither shown as one nor cleared with it."""
    mine = [Claim("web", "udp", 8080, 8080, "192.168.77.10", 80, 80)]
    assert [row["rule"] for row in parse(LISTING, mine)] == ["web"]
    assert parse(LISTING, [Claim("web", "udp", 8080, 8080, "192.168.77.99", 80, 80)]) == []
    assert parse(LISTING, [Claim("web", "udp", 8080, 8080, "192.168.77.10", 81, 81)]) == []
    assert Claim("six", "tcp", 443, 443, "2001:db8::10").owns("tcp", 443, "2001:0db8::0010", 443)


def test_other_dnat_flows_and_bad_xml_are_left_out() -> None:
    assert parse(LISTING, []) == []
    assert parse("<conntrack><flow>", CLAIMS) == []
    assert parse("", CLAIMS) == []
