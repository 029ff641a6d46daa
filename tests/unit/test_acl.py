"""acl: deny wins, empty allow admits all, first matching route wins, v4-mapped clients."""

from __future__ import annotations

import ipaddress

from portfwd.acl import AccessPolicy, Route, client_ip
from portfwd.addr import parse_target


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def test_empty_policy_admits_everyone() -> None:
    policy = AccessPolicy()
    assert policy.is_open
    assert policy.permits(client_ip("203.0.113.9"))
    assert policy.permits(None)


def test_deny_wins_over_allow() -> None:
    policy = AccessPolicy(allow=(net("192.168.0.0/16"),), deny=(net("192.168.5.0/24"),))
    assert policy.permits(client_ip("192.168.1.1"))
    assert not policy.permits(client_ip("192.168.5.7"))
    assert not policy.permits(client_ip("10.0.0.1"))
    assert not policy.permits(None)


def test_ipv4_mapped_clients_match_ipv4_rules() -> None:
    policy = AccessPolicy(allow=(net("127.0.0.0/8"),))
    assert client_ip("::ffff:127.0.0.1") == ipaddress.ip_address("127.0.0.1")
    assert policy.permits(client_ip("::ffff:127.0.0.1"))
    assert not policy.permits(client_ip("::1"))


def test_first_matching_route_wins() -> None:
    default = parse_target("10.0.0.5:80")
    first, second = parse_target("10.0.0.6:80"), parse_target("10.0.0.7:80")
    policy = AccessPolicy(routes=(Route((net("10.0.0.0/8"),), first), Route((net("10.1.0.0/16"),), second)))
    assert policy.target_for(client_ip("10.1.2.3"), default) == first
    assert policy.target_for(client_ip("192.0.2.1"), default) == default
    assert policy.target_for(None, default) == default
