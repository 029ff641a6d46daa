"""relay/transparent.py's host check from captured `ip -j`/`nft -j` output, and the family rules
of relay/upstream.py's transparent connect. No root: nothing here opens a transparent socket."""

from __future__ import annotations

import json
import socket

import pytest

from portfwd.addr import parse_listen, parse_target
from portfwd.errors import UpstreamError
from portfwd.relay.transparent import (
    MarkRule,
    ToolError,
    capable,
    mark_rules,
    nft_command,
    problems,
    routes_locally,
    socket_marks,
)
from portfwd.relay.upstream import Connect, client_source
from portfwd.specs import RuleSpec

# Captured on this machine kind (iproute2 6.1, nft 1.0.6) in a namespace set up as the README says.
RULES = (
    '[{"priority":0,"src":"all","table":"local"},{"priority":32765,"src":"all","fwmark":"0x1",'
    '"table":"100"},{"priority":32766,"src":"all","table":"main"},{"priority":32767,"src":"all",'
    '"table":"default"}]'
)
NO_RULES = (
    '[{"priority":0,"src":"all","table":"local"},{"priority":32766,"src":"all","table":"main"},'
    '{"priority":32767,"src":"all","table":"default"}]'
)
LOCAL4 = '[{"type":"local","dst":"default","dev":"lo","scope":"host","flags":[]}]'
LOCAL6 = '[{"type":"local","dst":"default","dev":"lo","metric":1024,"flags":[],"pref":"medium"}]'
META = {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}
CHAIN = {
    "chain": {
        "family": "inet", "table": "portfwd_transparent", "name": "prerouting", "handle": 1,
        "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept",
    }
}  # fmt: skip


def marking(
    mark: object, family: str = "inet", chain: str = "prerouting", table: str = "portfwd_transparent"
) -> dict[str, object]:
    return {
        "rule": {
            "family": family, "table": table, "chain": chain, "handle": 2,
            "expr": [
                {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
                {"match": {"op": "==", "left": {"socket": {"key": "transparent"}}, "right": 1}},
                {"mangle": {"key": {"meta": {"key": "mark"}}, "value": mark}},
            ],
        }
    }  # fmt: skip


def ruleset(*items: dict[str, object]) -> str:
    return json.dumps({"nftables": [META, *items]})


MARKED = ruleset({"table": {"family": "inet", "name": "portfwd_transparent", "handle": 1}}, CHAIN, marking(1))
STATUS_ROOT = "Name:\tpython\nCapEff:\t000001ffffffffff\n"
STATUS_NONE = "Name:\tpython\nCapEff:\t0000000000000000\n"


def rule(listen: str = "0.0.0.0:8080", connect: str = "192.0.2.2:80", **fields: object) -> RuleSpec:
    fields.setdefault("transparent", True)
    return RuleSpec(
        label=str(fields.pop("label", "web")),
        name=None,
        listen=parse_listen(listen),
        connect=parse_target(connect),
        **fields,  # type: ignore[arg-type]
    )


class Host:
    """A fake `run`: answers from a table of argv -> output, and records what was asked."""

    def __init__(self, answers: dict[str, tuple[int, str, str] | ToolError]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, argv: list[str]) -> tuple[int, str, str]:
        command = " ".join(argv)
        self.asked.append(command)
        answer = self.answers.get(command, (2, "", "Error: ipv4: FIB table does not exist.\n"))
        if isinstance(answer, ToolError):
            raise answer
        return answer


def ready(changes: dict[str, tuple[int, str, str] | ToolError] | None = None) -> Host:
    """A host set up as the README says, for both versions, then `changes` (command -> answer)."""
    answers: dict[str, tuple[int, str, str] | ToolError] = {
        "ip -4 -j rule show": (0, RULES, ""),
        "ip -6 -j rule show": (0, RULES, ""),
        "ip -4 -j route show table 100": (0, LOCAL4, ""),
        "ip -6 -j route show table 100": (0, LOCAL6, ""),
        "nft -j list ruleset": (0, MARKED, ""),
    }
    answers.update(changes or {})
    return Host(answers)


def check(host: Host, *rules: RuleSpec, status: str = STATUS_ROOT, user: str | None = None) -> list[str]:
    return problems(rules, run=host, status=lambda: status, user=user)


# -- parsing -------------------------------------------------------------------------------------


def test_fwmark_rules_are_read_with_their_mask_and_negated_ones_skipped() -> None:
    text = (
        '[{"priority":0,"src":"all","table":"local"},{"priority":32764,"not":null,"src":"all",'
        '"fwmark":"0x3","table":"300"},{"priority":32765,"src":"all","fwmark":"0x2","fwmask":"0xff",'
        '"table":"200"}]'
    )
    assert mark_rules(text) == [MarkRule(2, 0xFF, "200")]
    assert mark_rules(RULES) == [MarkRule(1, 0xFFFFFFFF, "100")]
    assert str(MarkRule(2, 0xFF, "200")) == "fwmark 0x2/0xff lookup 200"
    assert MarkRule(2, 0xFF, "200").matches(0x102)
    assert not MarkRule(1, 0xFFFFFFFF, "100").matches(0x101)


def test_a_local_default_route_to_lo_is_recognised() -> None:
    assert routes_locally(LOCAL4)
    assert routes_locally(LOCAL6)
    assert not routes_locally('[{"type":"unicast","dst":"default","gateway":"192.0.2.1","dev":"eth0"}]')
    assert not routes_locally('[{"type":"local","dst":"default","dev":"eth0"}]')
    assert not routes_locally("")


def test_marks_of_a_regular_chain_count_and_an_output_chain_does_not() -> None:
    divert = {"chain": {"family": "ip", "table": "t2", "name": "divert", "handle": 1}}
    output = {
        "chain": {
            "family": "ip6", "table": "t3", "name": "out", "handle": 1,
            "type": "filter", "hook": "output", "prio": 0, "policy": "accept",
        }
    }  # fmt: skip
    text = ruleset(
        CHAIN,
        marking(1),
        divert,
        marking({"|": [{"meta": {"key": "mark"}}, 4]}, "ip", "divert", "t2"),
        output,
        marking(9, "ip6", "out", "t3"),
    )
    assert socket_marks(text) == {"inet": [1], "ip": [4]}


def test_iptables_nft_socket_match_counts_with_an_unknown_mark() -> None:
    xt = {
        "rule": {
            "family": "ip", "table": "mangle", "chain": "DIVERT", "handle": 4,
            "expr": [{"xt": {"type": "match", "name": "socket"}}, {"xt": {"type": "target", "name": "MARK"}}],
        }
    }  # fmt: skip
    assert socket_marks(ruleset({"chain": {"family": "ip", "table": "mangle", "name": "DIVERT"}}, xt)) == {
        "ip": [None]
    }


def test_capabilities_from_proc_status() -> None:
    assert capable(STATUS_ROOT) is True
    assert capable(STATUS_NONE) is False
    assert capable("CapEff:\t0000000000001000\n") is True  # CAP_NET_ADMIN alone
    assert capable("CapEff:\t0000000000002000\n") is True  # CAP_NET_RAW alone
    assert capable("Name:\tx\n") is None


# -- problems() ----------------------------------------------------------------------------------


def test_nothing_is_asked_without_a_transparent_rule() -> None:
    host = ready()
    assert check(host, rule(transparent=False)) == []
    assert host.asked == []


def test_a_host_set_up_as_the_readme_says_has_no_problem() -> None:
    host = ready()
    assert check(host, rule(), rule("[::]:8081", "[2001:db8:2::2]:80", label="v6")) == []
    assert "ip -6 -j rule show" in host.asked


def test_ipv6_routing_is_checked_only_for_rules_with_ipv6_targets() -> None:
    host = ready({"ip -6 -j rule show": (0, NO_RULES, "")})
    assert check(host, rule()) == []
    assert "ip -6 -j rule show" not in host.asked


def test_a_bare_host_gets_the_commands_to_run() -> None:
    host = ready(
        {
            "ip -4 -j rule show": (0, NO_RULES, ""),
            "ip -6 -j rule show": (0, NO_RULES, ""),
            "nft -j list ruleset": (0, ruleset(), ""),
        }
    )
    lines = check(host, rule(), rule("[::]:8081", "[2001:db8:2::2]:80", label="v6"))
    assert lines == [
        "transparent rules web, v6: no nftables rule marks IPv4 and IPv6 packets of transparent sockets "
        "(`socket transparent 1 meta mark set`), so the backends' answers would not reach portfwd; "
        f"run: {nft_command(1)}",
        "transparent rule web: the backends' IPv4 answers to client addresses would not reach portfwd: "
        "no ip rule sends marked packets to a table with a local default route; "
        "run: ip rule add fwmark 0x1 lookup 100 && ip route add local 0.0.0.0/0 dev lo table 100",
        "transparent rule v6: the backends' IPv6 answers to client addresses would not reach portfwd: "
        "no ip rule sends marked packets to a table with a local default route; "
        "run: ip -6 rule add fwmark 0x1 lookup 100 && ip -6 route add local ::/0 dev lo table 100",
    ]


def test_an_ip_rule_whose_table_lacks_the_local_route() -> None:
    host = ready({"ip -4 -j route show table 100": (0, "[]", "")})
    assert check(host, rule()) == [
        "transparent rule web: `ip rule` fwmark 0x1 lookup 100, but table 100 has no local default "
        "route, so the backends' IPv4 answers would not reach portfwd; "
        "run: ip route add local 0.0.0.0/0 dev lo table 100"
    ]


def test_a_mark_no_ip_rule_matches() -> None:
    host = ready({"nft -j list ruleset": (0, ruleset(CHAIN, marking(2)), "")})
    assert check(host, rule()) == [
        "transparent rule web: the backends' IPv4 answers to client addresses would not reach portfwd: "
        "nftables marks them 0x2, but `ip rule` routes only fwmark 0x1 lookup 100; "
        "run: ip rule add fwmark 0x2 lookup 100"
    ]


def test_the_suggested_nft_rule_uses_the_mark_the_ip_rule_routes() -> None:
    host = ready(
        {
            "ip -4 -j rule show": (0, RULES.replace('"0x1"', '"0x7"'), ""),
            "nft -j list ruleset": (0, ruleset(), ""),
        }
    )
    assert check(host, rule()) == [
        "transparent rule web: no nftables rule marks IPv4 packets of transparent sockets "
        "(`socket transparent 1 meta mark set`), so the backends' answers would not reach portfwd; "
        f"run: {nft_command(7)}"
    ]


def test_missing_tools_and_no_privilege_are_lines_not_exceptions() -> None:
    host = ready(
        {
            "ip -4 -j rule show": ToolError("ip is not installed (apt-get install iproute2)"),
            "nft -j list ruleset": ToolError("nft is not installed (apt-get install nftables)"),
        }
    )
    assert check(host, rule(), status=STATUS_NONE, user="nobody") == [
        "transparent rule web: user = 'nobody' drops every capability after binding, and each "
        "transparent connection needs CAP_NET_ADMIN; remove user = (run as root, or with CAP_NET_ADMIN)",
        "transparent rule web: this process has no CAP_NET_ADMIN, and each transparent connection "
        "needs it; run portfwd as root, or give it CAP_NET_ADMIN (systemd: AmbientCapabilities=CAP_NET_ADMIN)",
        "transparent rule web: cannot read the IPv4 policy routing: ip is not installed "
        "(apt-get install iproute2)",
        "transparent rule web: cannot tell whether packets of transparent sockets are marked: "
        "nft is not installed (apt-get install nftables)",
    ]


def test_nft_refused_says_to_run_as_root() -> None:
    refused = (
        1,
        "",
        "Operation not permitted (you must be root)\nnetlink: Error: cache initialization failed\n",
    )
    lines = check(ready({"nft -j list ruleset": refused}), rule())
    assert lines == [
        "transparent rule web: cannot tell whether packets of transparent sockets are marked: "
        "`nft list ruleset` failed (Operation not permitted (you must be root)); run as root to check"
    ]


def test_a_listener_of_the_other_version_than_every_target() -> None:
    lines = check(ready(), rule("[2001:db8:1::1]:8080", "192.0.2.2:80"), rule("[::]:8081", label="any"))
    assert lines == [
        "transparent rule web: listens on IPv6 but connects to IPv4, and a connection cannot leave "
        "from an IPv6 client's address to an IPv4 target; give the listener and the targets the same IP version"
    ]


def test_the_real_runner_reports_a_missing_program() -> None:
    from portfwd.relay.transparent import run_command

    with pytest.raises(ToolError, match="not installed"):
        run_command(["portfwd-no-such-program"])


# -- the transparent connect's address families ---------------------------------------------------


def test_an_ipv4_mapped_client_leaves_as_ipv4() -> None:
    targets = [(socket.AF_INET6, ("2001:db8::1", 80)), (socket.AF_INET, ("192.0.2.2", 80))]
    assert client_source(targets, "::ffff:198.51.100.2") == (targets[1:], "198.51.100.2", None)
    assert client_source(targets, "198.51.100.2") == (targets[1:], "198.51.100.2", None)
    assert client_source(targets, "2001:db8:1::2") == (targets[:1], "2001:db8:1::2", None)


@pytest.mark.parametrize(
    ("source", "target", "words"),
    [
        ("2001:db8:1::2", (socket.AF_INET, ("192.0.2.2", 80)), "is IPv6 but the target is IPv4"),
        ("::ffff:198.51.100.2", (socket.AF_INET6, ("2001:db8::1", 80)), "is IPv4 but the target is IPv6"),
    ],
)
async def test_a_client_of_the_other_family_fails_at_once(
    source: str, target: tuple[int, tuple[str, int]], words: str
) -> None:
    outcome: list[tuple[socket.socket | None, UpstreamError | None]] = []
    attempt = Connect([target], 5, lambda s, e: outcome.append((s, e)), source=source)
    assert len(outcome) == 1
    upstream, error = outcome[0]
    assert upstream is None
    assert error is not None
    assert error.reason == "transparent"
    assert f"transparent: the client {source} {words}" in error.message
    assert attempt._timer is None
