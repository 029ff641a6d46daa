"""A misbehaving router on loopback: broken UPnP XML and SOAP, garbage NAT-PMP/PCP datagrams.

No real router sends these on purpose, so the peers here are small scripted servers (stdlib
HTTP and UDP). What is checked is what the user sees: exit 1 and exactly one line, never a
traceback.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from tests.integration.processes import REPO

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


def serve(pages: dict[str, tuple[int, str]]) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            status, body = pages.get(self.path, (404, "no"))
            data = body.encode()
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


def portfwd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portfwd", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
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
    with contextlib.contextmanager(serve)(pages) as url:
        result = portfwd(
            "map", "ip", "--method", "upnp", "--gateway", "127.0.0.1", "--upnp-url", f"{url}/desc.xml"
        )
    expected = error.format(url=url)
    assert result.returncode == 1
    assert result.stderr.startswith(expected), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_garbage_datagrams_are_skipped_then_reported_in_one_line() -> None:
    """A 'router' that answers every NAT-PMP/PCP request with a wrong or truncated datagram."""
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
            "map", "add", "8000/tcp", "--gateway", "127.0.0.1", "--method", "pcp", "--tries", "1"
        )
        natpmp = portfwd("map", "ip", "--gateway", "127.0.0.1", "--method", "natpmp", "--tries", "3")
    finally:
        stop.set()
        thread.join(5)
        sock.close()
    assert (result.returncode, result.stderr) == (
        1,
        "portfwd: PCP: no answer from 127.0.0.1:5351; last datagram: "
        "PCP reply with another nonce: not the answer to our request\n",
    )
    assert (natpmp.returncode, natpmp.stderr) == (
        1,
        "portfwd: NAT-PMP: no answer from 127.0.0.1:5351; last datagram: NAT-PMP reply truncated to 3 bytes (want 12)\n",
    )
