"""Fuzzing every parser with hypothesis: bad input yields ConfigError, never anything else."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from portfwd import config, planner
from portfwd.addr import parse_listen, parse_target
from portfwd.errors import ConfigError
from portfwd.forwardspec import rules_from_specs, split
from portfwd.proto import natpmp, pcp
from portfwd.proto.socks import SocksError, SocksServer
from portfwd.tunnelspec import parse_destination, parse_forward, parse_option

SPEC_ALPHABET = st.sampled_from([*"0123456789:[]/-.*abcdefux+ %", "unix:", "udp", "tcp", "::", "65536"])
spec_text = st.lists(SPEC_ALPHABET, max_size=30).map("".join)


@given(spec_text | st.text(max_size=40))
@settings(max_examples=400, deadline=None)
def test_spec_parser_only_raises_config_errors(text: str) -> None:
    try:
        split(text)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    try:
        rules_from_specs([text])
    except ConfigError as exc:
        assert all("\n" not in line for line in exc.problems)


@given(spec_text | st.text(max_size=40))
@settings(max_examples=400, deadline=None)
def test_endpoint_parsers_only_raise_config_errors(text: str) -> None:
    for parse in (parse_listen, parse_target):
        try:
            parse(text)
        except ConfigError as exc:
            assert "\n" not in str(exc)


toml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.floats(allow_nan=False),
    spec_text,
    st.text(max_size=10),
    st.from_regex(r"[0-9]{1,4}(\.[0-9])? ?[kKmMgG]?(bit|i?B)(/s)?", fullmatch=True),
)
keys = st.sampled_from(
    [
        "name",
        "listen",
        "connect",
        "protocol",
        "allow",
        "deny",
        "route",
        "udp_idle_timeout",
        "udp_max_flows",
        "connect_timeout",
        "relay",
        "dual_stack",
        "backlog",
        "source",
        "backend",
        "balance",
        "health",
        "weight",
        "backup",
        "interval",
        "send",
        "expect",
        "bandwidth",
        "bandwidth_per_connection",
        "transparent",
        "wan",
        "lan",
        "ha",
        "peer",
        "virtual_addresses",
        "sync_interface",
        "priority",
        "advert_interval",
        "ipv6_firewall",
        "open_other_tables",
        "flowtable",
        "port",
        "to",
        "forward",
        "bogus",
    ]
)
values: Any = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=8,
)


@given(
    st.dictionaries(
        st.sampled_from(["forward", "metrics", "control", "user", "tunnel", "gateway", "x"]),
        values,
        max_size=3,
    )
)
@settings(max_examples=300, deadline=None)
def test_config_validation_only_raises_config_errors(data: dict[str, Any]) -> None:
    try:
        planner.plan(config.validate(data))  # the planner refuses what the kernel relay cannot do
    except ConfigError as exc:
        assert exc.problems
        assert all("\n" not in line for line in exc.problems)


@given(st.binary(max_size=200))
@settings(max_examples=200, deadline=None)
def test_config_loader_survives_any_bytes(tmp_path_factory: Any, raw: bytes) -> None:
    path: Path = tmp_path_factory.mktemp("fuzz") / "portfwd.toml"
    path.write_bytes(raw)
    try:
        config.load(path)
    except ConfigError as exc:
        assert all("\n" not in line for line in exc.problems)
    except tomllib.TOMLDecodeError as exc:  # pragma: no cover - must never escape
        raise AssertionError("TOML errors must be translated") from exc


# ------------------------------------------------------------------------- SSH specs and SOCKS


@given(st.sampled_from(["local", "remote", "dynamic"]), spec_text | st.text(max_size=40))
@settings(max_examples=400, deadline=None)
def test_tunnel_spec_parser_only_raises_config_errors(kind: Any, text: str) -> None:
    try:
        parse_forward(kind, text)
    except ConfigError as exc:
        assert "\n" not in str(exc)


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_destination_and_option_parsers_only_raise_config_errors(text: str) -> None:
    for parse in (parse_destination, lambda value: parse_option(value, {})):
        try:
            parse(text)
        except ConfigError as exc:
            assert "\n" not in str(exc)


SOCKS_START = st.sampled_from(
    [b"\x04\x01", b"\x05\x01\x00\x05\x01\x00", b"\x05\x02\x00\x02", b"\x04", b"\x05", b""]
)


@given(SOCKS_START, st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=20), st.booleans())
@settings(max_examples=600, deadline=None)
def test_socks_codec_yields_a_request_or_a_socks_error(
    start: bytes, body: bytes, cuts: list[int], password: bool
) -> None:
    """Any bytes, in any fragmentation: a Request, 'need more', or SocksError; nothing else."""
    codec = SocksServer(("user", "pass") if password else None)
    data = start + body
    chunks, at = [], 0
    for cut in cuts:
        chunks.append(data[at : at + cut])
        at += cut
    chunks.append(data[at:])
    try:
        for chunk in chunks:
            request = codec.feed(chunk)
            codec.outgoing()
            if request is not None:
                assert 0 < request.port < 65536
                assert request.host
                break
    except SocksError as exc:
        assert "\n" not in exc.message
        assert len(exc.reply) <= 10


NATPMP_REQUESTS = [natpmp.external_address_request(), natpmp.map_request("udp", 5000, 0, 60)]
PCP_REQUEST = pcp.map_request(
    nonce=bytes(12), protocol="udp", internal_port=5000, external_port=0, lifetime=60,
    client=ipaddress.IPv4Address("10.0.0.2"),
)  # fmt: skip


@given(st.sampled_from(NATPMP_REQUESTS), st.binary(max_size=40) | st.binary(min_size=12, max_size=16))
@settings(max_examples=600, deadline=None)
def test_natpmp_codec_yields_an_event_or_a_reply_error(request: bytes, data: bytes) -> None:
    try:
        natpmp.parse_reply(data, request)
    except natpmp.NatPmpReplyError as exc:
        assert exc.message
        assert "\n" not in exc.message
    natpmp.parse_announcement(data)


PCP_LIKE = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from([b"\x02\x81", b"\x02\x80", b"\x00\x81", b"\x02\x01"]),
    st.binary(min_size=0, max_size=70),
)


@given(
    st.binary(max_size=80)
    | PCP_LIKE
    | st.builds(
        lambda tail: PCP_REQUEST[:2].replace(b"\x01", b"\x81") + tail, st.binary(min_size=58, max_size=58)
    )
)
@settings(max_examples=800, deadline=None)
def test_pcp_codec_yields_an_event_or_a_reply_error(data: bytes) -> None:
    try:
        pcp.parse_reply(data, PCP_REQUEST)
    except pcp.PcpReplyError as exc:
        assert exc.message
        assert "\n" not in exc.message
    pcp.parse_announcement(data)


@given(
    st.text(max_size=300)
    | st.builds(lambda t: f"<conntrack><flow>{t}</flow></conntrack>", st.text(max_size=200))
)
@settings(max_examples=300, deadline=None)
def test_conntrack_listing_parser_never_raises(text: str) -> None:
    from portfwd.kernel.conntrack import Claim, parse

    assert isinstance(parse(text, [Claim("r", "tcp", 1, 65535)]), list)
