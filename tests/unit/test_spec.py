"""spec: the CLI forward grammar, including every example of PRODUCT.md."""

from __future__ import annotations

import pytest

from portfwd.errors import ConfigError
from portfwd.forwardspec import rules_from_specs, split


@pytest.mark.parametrize(
    ("text", "parts", "listen", "connect"),
    [
        ("8080:10.0.0.5:80", ("8080", "10.0.0.5:80", "tcp"), "*:8080", "10.0.0.5:80"),
        (
            "127.0.0.1:8080:web.internal:80",
            ("127.0.0.1:8080", "web.internal:80", "tcp"),
            "127.0.0.1:8080",
            "web.internal:80",
        ),
        (
            "[::1]:8080:[2001:db8::5]:80",
            ("[::1]:8080", "[2001:db8::5]:80", "tcp"),
            "[::1]:8080",
            "[2001:db8::5]:80",
        ),
        ("5353:10.0.0.1:53/udp", ("5353", "10.0.0.1:53", "udp"), "*:5353", "10.0.0.1:53"),
        ("5353:10.0.0.1:53/tcp+udp", ("5353", "10.0.0.1:53", "tcp+udp"), "*:5353", "10.0.0.1:53"),
        (
            "8000-8010:backend:9000-9010",
            ("8000-8010", "backend:9000-9010", "tcp"),
            "*:8000-8010",
            "backend:9000-9010",
        ),
        ("2323:unix:/run/app.sock", ("2323", "unix:/run/app.sock", "tcp"), "*:2323", "unix:/run/app.sock"),
        (
            "unix:/tmp/in.sock:backend:80",
            ("unix:/tmp/in.sock", "backend:80", "tcp"),
            "unix:/tmp/in.sock",
            "backend:80",
        ),
        (
            "unix:/tmp/in.sock:unix:/run/app.sock",
            ("unix:/tmp/in.sock", "unix:/run/app.sock", "tcp"),
            "unix:/tmp/in.sock",
            "unix:/run/app.sock",
        ),
    ],
)
def test_product_examples(text: str, parts: tuple[str, str, str], listen: str, connect: str) -> None:
    assert split(text) == parts
    rule = rules_from_specs([text]).forward[0]
    assert str(rule.listen) == listen
    assert str(rule.connect[0]) == connect
    assert rule.protocol.value == parts[2]


@pytest.mark.parametrize(
    ("specs", "lines"),
    [
        (
            ["8080:80"],
            [
                "spec 1: '8080:80' is not a forward spec; "
                "write [bind:]port:host:hostport[/udp], e.g. 8080:10.0.0.5:80"
            ],
        ),
        (
            ["a:b:c:d:e"],
            [
                "spec 1: 'a:b:c:d:e' is not a forward spec; "
                "write [bind:]port:host:hostport[/udp], e.g. 8080:10.0.0.5:80"
            ],
        ),
        ([""], ["spec 1: empty forward spec; write [bind:]port:host:hostport[/udp], e.g. 8080:10.0.0.5:80"]),
        (
            ["8080:10.0.0.5:70000"],
            ["spec 1 (8080:10.0.0.5:70000) target: port 70000 is out of range (1-65535)"],
        ),
        (["99999:h:1"], ["spec 1 (99999:h:1) listen side: port 99999 is out of range (1-65535)"]),
        (
            ["1:h:1", "2:h:2/udp", "1:h:3"],
            [
                "spec 3 (1:h:3) listen side: *:1/tcp is already used by forward[0]; give each rule its own port"
            ],
        ),
        ([], ["no forward spec given; write e.g. portfwd forward 8080:10.0.0.5:80"]),
    ],
)
def test_bad_specs(specs: list[str], lines: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        rules_from_specs(specs)
    assert info.value.problems == lines


def test_allow_deny_errors_are_reported_once() -> None:
    with pytest.raises(ConfigError) as info:
        rules_from_specs(["1:h:1", "2:h:2"], allow=["10.0.0.1/8"])
    assert info.value.problems == ["--allow: '10.0.0.1/8' has host bits set; write 10.0.0.0/8"]


def test_allow_and_deny_apply_to_every_spec() -> None:
    loaded = rules_from_specs(["1:h:1", "2:h:2"], allow=["10.0.0.0/8"], deny=["10.9.0.0/16"])
    assert all(str(rule.allow[0]) == "10.0.0.0/8" for rule in loaded.forward)
    assert all(str(rule.deny[0]) == "10.9.0.0/16" for rule in loaded.forward)
