"""addr: endpoints and port ranges."""

from __future__ import annotations

import pytest

from portfwd.addr import HostPorts, PortRange, UnixPath, parse_listen, parse_target, target_port
from portfwd.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080", HostPorts("", PortRange(8080, 8080))),
        ("*:8080", HostPorts("", PortRange(8080, 8080))),
        ("0.0.0.0:8080", HostPorts("0.0.0.0", PortRange(8080, 8080))),
        ("[::]:8080", HostPorts("::", PortRange(8080, 8080))),
        ("[::1]:8000-8010", HostPorts("::1", PortRange(8000, 8010))),
        ("localhost:1", HostPorts("localhost", PortRange(1, 1))),
        ("8000-8010", HostPorts("", PortRange(8000, 8010))),
        ("unix:/run/app.sock", UnixPath("/run/app.sock")),
    ],
)
def test_listen_forms(text: str, expected: object) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("70000", "port 70000 is out of range (1-65535)"),
        ("0", "port 0 is out of range (1-65535)"),
        ("host:http", "port 'http' is not a number; write a port number such as 8080"),
        ("::1:80", "IPv6 address '::1' must be in brackets; write [::1]:80"),
        ("[::1:80", "'[::1:80' has an unclosed '['; write [::1]:PORT"),
        ("[zz]:80", "'[zz]' is not an IPv6 address; write an address such as [::1]"),
        (
            "1.2.3:80",
            "'1.2.3' is not a valid host name or IP address; "
            "write a name such as db.internal or an address such as 10.0.0.5",
        ),
        ("9000-8000", "port range 9000-8000 is reversed; write 8000-9000"),
        ("unix:", "missing Unix socket path; write unix:/run/app.sock"),
        (
            "unix:run/x",
            "Unix socket path 'run/x' is relative; write an absolute path such as unix:/run/app.sock",
        ),
    ],
)
def test_listen_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.5", "missing port; write host:port"),
        ("10.0.0.5:", "missing port; write host:port"),
        ("80", "missing host; write host:80"),
        ("*:80", "missing host; write host:port"),
        (
            "bad host:80",
            "'bad host' is not a valid host name or IP address; "
            "write a name such as db.internal or an address such as 10.0.0.5",
        ),
    ],
)
def test_target_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_target(text)
    assert str(info.value) == message


def test_target_keeps_names_for_connect_time_resolution() -> None:
    assert parse_target("web.internal:80") == HostPorts("web.internal", PortRange(80, 80))
    assert parse_target("[2001:db8::5]:80") == HostPorts("2001:db8::5", PortRange(80, 80))


def test_range_offsets() -> None:
    listen, target = PortRange(8000, 8010), PortRange(9000, 9010)
    assert target_port(listen, target, 8000) == 9000
    assert target_port(listen, target, 8007) == 9007
    assert target_port(listen, PortRange(9000, 9000), 8007) == 9000
