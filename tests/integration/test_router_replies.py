"""A misbehaving router on loopback: broken UPnP XML and SOAP, garbage NAT-PMP/PCP datagrams.

No real router sends these on purpose, so the peers here are small scripted servers (stdlib
HTTP and UDP). What is checked is what the user sees: exit 1 and exactly one line, never a
traceback.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.processes import READY, REPO, portfwd_argv, started

pytestmark = [pytest.mark.integration]

DESCRIPTION = """<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><specVersion><major>1</major><minor>0</minor></specVersion>
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<friendlyName>broken</friendlyName><UDN>uuid:00000000-0000-0000-0000-000000000001</UDN>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><SCPDURL>/scpd.xml</SCPDURL>
<controlURL>/ctl</controlURL><eventSubURL>/evt</eventSubURL></service></serviceList></device></root>"""

SCPD = """<?xml version="1.0"?>
<scpd xmlns="urn:schemas-upnp-org:service-1-0"><specVersion><major>1</major><minor>0</minor></specVersion>
<actionList><action><name>GetExternalIPAddress</name><argumentList><argument><name>NewExternalIPAddress</name>
<direction>out</direction><relatedStateVariable>ExternalIPAddress</relatedStateVariable></argument>
</argumentList></action></actionList><serviceStateTable><stateVariable sendEvents="no">
<name>ExternalIPAddress</name><dataType>string</dataType></stateVariable></serviceStateTable></scpd>"""


@contextlib.contextmanager
def router_http(answer: Callable[[str, str, str], tuple[int, str]]) -> Iterator[str]:
    """A scripted router's HTTP side on loopback: `answer(path, soap_action, body)` -> (status, XML)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
            action = self.headers.get("SOAPAction", "").strip('"').rsplit("#", 1)[-1]
            status, text = answer(self.path, action, body)
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", 'text/xml; charset="utf-8"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def portfwd(*args: str, timeout: float = 60, full_cli: bool = False) -> subprocess.CompletedProcess[str]:
    """The `portfwd` command; `full_cli` calls `portfwd.cli.main` in-process (no quick exit)."""
    start = ["-c", "from portfwd.cli import main; main()"] if full_cli else ["-m", "portfwd"]
    return subprocess.run(
        [sys.executable, *start, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.mark.parametrize(
    ("pages", "error"),
    [
        (
            {"/desc.xml": (200, "<root><device>")},
            "portfwd: UPnP: cannot read the device description at {url}/desc.xml: ",
        ),
        (
            {
                "/desc.xml": (200, DESCRIPTION.replace("WANIPConnection", "Layer3Forwarding")),
                "/scpd.xml": (200, SCPD),
            },
            "portfwd: UPnP: the device at {url}/desc.xml has no WANIPConnection or WANPPPConnection service\n",
        ),
        (
            {"/desc.xml": (200, DESCRIPTION), "/scpd.xml": (200, SCPD), "/ctl": (200, "<<not soap")},
            "portfwd: UPnP GetExternalIPAddress at {url}/desc.xml: ",
        ),
        (
            {
                "/desc.xml": (200, DESCRIPTION),
                "/scpd.xml": (200, SCPD),
                "/ctl": (
                    200,
                    '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
                    '<s:Body><u:GetExternalIPAddressResponse xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1">'
                    "<NewExternalIPAddress>not-an-ip</NewExternalIPAddress>"
                    "</u:GetExternalIPAddressResponse></s:Body></s:Envelope>",
                ),
            },
            "portfwd: UPnP: the router at {url}/desc.xml reports external address 'not-an-ip'\n",
        ),
        (
            {"/desc.xml": (200, DESCRIPTION), "/scpd.xml": (200, SCPD), "/ctl": (500, "<fault")},
            "portfwd: UPnP GetExternalIPAddress at {url}/desc.xml: ",
        ),
    ],
)
def test_broken_upnp_router_gives_one_line(pages: dict[str, tuple[int, str]], error: str) -> None:
    with router_http(lambda path, _action, _body: pages.get(path, (404, "no"))) as url:
        result = portfwd(
            "map", "ip", "--method", "upnp", "--gateway", "127.0.0.1", "--upnp-url", f"{url}/desc.xml"
        )
    expected = error.format(url=url)
    assert result.returncode == 1
    assert result.stderr.startswith(expected), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("full_cli", [False, True], ids=["fast-path", "full-cli"])
def test_garbage_datagrams_are_skipped_then_reported_in_one_line(
    full_cli: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 'router' that answers every NAT-PMP/PCP request with a wrong or truncated datagram.

    The same words whether the executable (which exits without teardown) or `main()` ran it.
    """
    monkeypatch.setenv("PORTFWD_STATE_DIR", str(tmp_path))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 5351))
    except OSError as exc:
        pytest.fail(f"cannot play the router on 127.0.0.1:5351: {exc}")
    stop = threading.Event()

    def answer() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(2048)
            except TimeoutError:
                continue
            if data[:1] == b"\x02":  # PCP: right shape, wrong nonce
                sock.sendto(bytes([2, 0x81, 0, 0]) + bytes(20) + bytes(36), peer)
            else:  # NAT-PMP: truncated
                sock.sendto(b"\x00\x80\x00", peer)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        result = portfwd(
            "map",
            "add",
            "8000/tcp",
            "--gateway",
            "127.0.0.1",
            "--method",
            "pcp",
            "--tries",
            "1",
            full_cli=full_cli,
        )
        natpmp = portfwd(
            "map", "ip", "--gateway", "127.0.0.1", "--method", "natpmp", "--tries", "3", full_cli=full_cli
        )
    finally:
        stop.set()
        thread.join(5)
        sock.close()
    # The time waited is measured: one PCP try is 3 s ± 10 % (RFC 6887 jitter), three NAT-PMP
    # tries 250 + 500 + 1000 ms.
    assert result.returncode == 1
    assert re.fullmatch(
        r"portfwd: PCP: no answer from 127\.0\.0\.1:5351 in (2\.[7-9]|3|3\.[1-4]) s; last datagram: "
        r"PCP reply with another nonce: not the answer to our request\n",
        result.stderr,
    ), result.stderr
    assert natpmp.returncode == 1
    assert re.fullmatch(
        r"portfwd: NAT-PMP: no answer from 127\.0\.0\.1:5351 in (1\.[7-9]|2(\.\d)?) s; "
        r"last datagram: NAT-PMP reply truncated to 3 bytes \(want 12\)\n",
        natpmp.stderr,
    ), natpmp.stderr


def _scpd() -> str:
    """A WANIPConnection SCPD with the four actions portfwd uses."""
    variables = {
        "ExternalIPAddress": "string", "RemoteHost": "string", "ExternalPort": "ui2", "InternalPort": "ui2",
        "PortMappingProtocol": "string", "InternalClient": "string", "PortMappingEnabled": "boolean",
        "PortMappingDescription": "string", "PortMappingLeaseDuration": "ui4",
    }  # fmt: skip
    key = [
        ("NewRemoteHost", "RemoteHost"),
        ("NewExternalPort", "ExternalPort"),
        ("NewProtocol", "PortMappingProtocol"),
    ]
    entry = [
        ("NewInternalPort", "InternalPort"), ("NewInternalClient", "InternalClient"),
        ("NewEnabled", "PortMappingEnabled"), ("NewPortMappingDescription", "PortMappingDescription"),
        ("NewLeaseDuration", "PortMappingLeaseDuration"),
    ]  # fmt: skip
    actions = {
        "GetExternalIPAddress": ([], [("NewExternalIPAddress", "ExternalIPAddress")]),
        "AddPortMapping": (key + entry, []),
        "GetSpecificPortMappingEntry": (key, entry),
        "DeletePortMapping": (key, []),
    }

    def arguments(items: list[tuple[str, str]], direction: str) -> str:
        return "".join(
            f"<argument><name>{name}</name><direction>{direction}</direction>"
            f"<relatedStateVariable>{var}</relatedStateVariable></argument>"
            for name, var in items
        )

    action_xml = "".join(
        f"<action><name>{name}</name><argumentList>{arguments(ins, 'in')}{arguments(outs, 'out')}</argumentList></action>"
        for name, (ins, outs) in actions.items()
    )
    state = "".join(
        f'<stateVariable sendEvents="no"><name>{name}</name><dataType>{kind}</dataType></stateVariable>'
        for name, kind in variables.items()
    )
    return (
        '<?xml version="1.0"?><scpd xmlns="urn:schemas-upnp-org:service-1-0"><specVersion><major>1</major>'
        f"<minor>0</minor></specVersion><actionList>{action_xml}</actionList>"
        f"<serviceStateTable>{state}</serviceStateTable></scpd>"
    )


def _soap(action: str, fields: dict[str, str]) -> str:
    body = "".join(f"<{key}>{value}</{key}>" for key, value in fields.items())
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
        f'<u:{action}Response xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1">{body}'
        f"</u:{action}Response></s:Body></s:Envelope>"
    )


def _fault(code: int) -> str:
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>'
        "<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>error {code}</errorDescription></UPnPError>"
        "</detail></s:Fault></s:Body></s:Envelope>"
    )


class QuirkyIgd:
    """An IGD with one of two quirks seen in the field: permanent leases only (725), or a lease
    other than the one asked for. Records every action it was asked."""

    def __init__(self, quirk: str) -> None:
        self.quirk = quirk
        self.calls: list[tuple[str, str]] = []
        self.mappings: dict[str, str] = {}

    def serve(self, path: str, action: str, body: str) -> tuple[int, str]:
        """GETs fetch the description and the SCPD; POSTs are SOAP actions."""
        if not action:
            return 200, DESCRIPTION if path == "/desc.xml" else _scpd()
        return self.answer(action, body)

    def answer(self, action: str, body: str) -> tuple[int, str]:
        import re

        def field(name: str) -> str:
            found = re.search(rf"<{name}>([^<]*)</{name}>", body)
            return found.group(1) if found else ""

        port = field("NewExternalPort")
        self.calls.append((action, field("NewLeaseDuration") if action == "AddPortMapping" else port))
        if action == "GetExternalIPAddress":
            return 200, _soap(action, {"NewExternalIPAddress": "198.51.100.7"})
        if action == "AddPortMapping":
            if self.quirk == "permanent-only" and field("NewLeaseDuration") != "0":
                return 500, _fault(725)
            self.mappings[port] = field("NewInternalClient")
            return 200, _soap(action, {})
        if action == "GetSpecificPortMappingEntry":
            if port not in self.mappings:
                return 500, _fault(714)
            lease = "0" if self.quirk == "permanent-only" else "120"
            return 200, _soap(action, {
                "NewInternalPort": "8000", "NewInternalClient": self.mappings[port], "NewEnabled": "1",
                "NewPortMappingDescription": "portfwd 8000/tcp", "NewLeaseDuration": lease,
            })  # fmt: skip
        if action == "DeletePortMapping":
            self.mappings.pop(port, None)
            return 200, _soap(action, {})
        return 500, _fault(401)


@pytest.mark.parametrize(
    ("quirk", "published", "lease_column"),
    [
        ("permanent-only", "(lease permanent, removed on exit)", 0),
        ("other-lease", "(lease 120 s)", 120),
    ],
)
def test_lease_quirks_under_run(tmp_path: Path, quirk: str, published: str, lease_column: int) -> None:
    """725 → lease 0 and deleted on exit; a lease the router changed is read back and trusted."""
    igd = QuirkyIgd(quirk)
    with router_http(igd.serve) as root:
        url = f"{root}/desc.xml"
        path = tmp_path / "map.toml"
        path.write_text(
            f'[control]\nsocket = "{tmp_path}/ctl.sock"\n[[map]]\nport = 8000\nexternal_port = 18000\n'
            f'method = "upnp"\nlease = "1h"\nupnp_url = "{url}"\ngateway = "127.0.0.1"\n'
        )
        with started(portfwd_argv("run", "-c", str(path)), READY) as proc:
            proc.wait_for(f"map[0]: 8000/tcp published at 198.51.100.7:18000 via upnp {published}")
            state = json.loads(portfwd("status", "-c", str(path), "--json").stdout)
            (row,) = state["mappings"]
            assert (row["lease"], row["state"]) == (lease_column, "up")
        assert igd.mappings == {}, "removed on exit"
    adds = [lease for action, lease in igd.calls if action == "AddPortMapping"]
    if quirk == "permanent-only":
        assert adds == ["3600", "0"], "asked for an hour, then for what the router can do"
    else:
        assert adds == ["3600"]
    assert ("DeletePortMapping", "18000") in igd.calls
