"""Router mapping against a real miniupnpd on the lab's gw (TESTBED §3): PCP, NAT-PMP, UPnP IGD.

portfwd runs in lan, as a home machine would; the mapping is checked by what crossed from wan
to the lan service through gw (sha256, and the address the service saw), and from the router's
side by stock `upnpc -l` and gw's nft ruleset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need_binary
from tests.integration.miniupnpd import URL, Router, router
from tests.integration.processes import READY, REPO, Proc
from tests.integration.topology import GW_LAN, GW_WAN, LAN_HOST, WAN_HOST, Lab, lab

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.netns]

REPLY = "echo peer=$SOCAT_PEERADDR; sha256sum"
METHODS = ("pcp", "natpmp", "upnp")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Router]]:
    """One lab and router for the module; each test leaves the router's table as it found it."""
    need_binary("upnpc", "miniupnpc")
    workdir = tmp_path_factory.mktemp("router")
    with lab() as net, router(net, workdir) as box:
        net.serve(net.lan, 8000, REPLY)
        yield net, box


@pytest.fixture
def net(home: tuple[Lab, Router]) -> Iterator[Lab]:
    lab_, box = home
    if box.proc is None or box.proc.poll() is not None:
        box.start()
    yield lab_
    assert router_mappings(lab_) == [], "each test removes its mappings"


def env(tmp: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PORTFWD_STATE_DIR": str(tmp / "state"), **extra}


def portfwd(net: Lab, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", net.lan, sys.executable, "-m", "portfwd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env(tmp),
    )


def router_mappings(net: Lab) -> list[str]:
    """The router's table as stock upnpc lists it: lines like ` 0 TCP 18000->192.168.77.10:8000 ...`."""
    out = net.run(net.lan, "upnpc", "-u", URL, "-i", "-l").stdout.decode()
    return [line.strip() for line in out.splitlines() if "->" in line and line.strip()[:1].isdigit()]


def dnat_rules(net: Lab, box: Router) -> list[str]:
    return [line.strip() for line in box.ruleset().splitlines() if "dnat" in line]


def reach(net: Lab, port: int, data: bytes) -> str:
    result = net.run(
        net.wan, "socat", "-t", "5", "-T", "10", "-", f"TCP4:{GW_WAN}:{port},connect-timeout=2", data=data
    )
    return result.stdout.decode(errors="replace")


def lease(line: str) -> int:
    """The lease `map add` printed. UPnP's is read back from the router, which counts down in
    whole seconds: a second boundary between the add and the read-back makes 3600 into 3599."""
    return int(line.rsplit("(lease ", 1)[1].split(" ", 1)[0])


def check_reachable(net: Lab, port: int) -> None:
    data = os.urandom(256 * 1024)
    reply = reach(net, port, data)
    assert reply.splitlines() == [f"peer={WAN_HOST}", f"{hashlib.sha256(data).hexdigest()}  -"]


@pytest.mark.parametrize("method", METHODS)
def test_add_reach_list_remove(net: Lab, home: tuple[Lab, Router], tmp_path: Path, method: str) -> None:
    box = home[1]
    external = 18000 + METHODS.index(method)
    assert reach(net, external, b"x") == "", "nothing is mapped yet"

    ip = portfwd(net, tmp_path, "map", "ip", "--method", method)
    where = URL if method == "upnp" else f"{GW_LAN}:5351"
    assert (ip.returncode, ip.stdout, ip.stderr) == (0, f"{GW_WAN} (via {method} at {where})\n", "")

    added = portfwd(net, tmp_path, "map", "add", "8000/tcp", "--external", str(external), "--lease", "1h",
                    "--method", method)  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert (
        added.stdout
        == f"{GW_WAN}:{external}/tcp -> {LAN_HOST}:8000 via {method} (lease {lease(added.stdout)} s)\n"
    )
    assert lease(added.stdout) in (3599, 3600)
    check_reachable(net, external)
    (line,) = router_mappings(net)
    assert f"TCP {external}->{LAN_HOST}:8000" in line
    assert any(f"dport {external}" in rule for rule in dnat_rules(net, box))

    listed = portfwd(net, tmp_path, "map", "list", "--upnp-url", URL, "--json")
    (entry,) = json.loads(listed.stdout)
    assert (entry["external_port"], entry["internal_host"], entry["internal_port"]) == (
        external,
        LAN_HOST,
        8000,
    )
    # UPnP by its description; PCP and NAT-PMP because portfwd wrote down what it was granted.
    assert (entry["ours"], entry["method"]) == (True, method)
    if method != "upnp":
        (mine,) = json.loads(portfwd(net, tmp_path, "map", "list", "--method", method, "--json").stdout)
        assert (mine["external_port"], mine["internal_host"], mine["internal_port"], mine["method"]) == (
            external,
            LAN_HOST,
            8000,
            method,
        )
        assert 3500 < mine["lease"] <= 3600, "the lease left, counted from what the router granted"
        table = portfwd(net, tmp_path, "map", "list", "--method", method).stdout
        assert re.search(rf"\*\s+{external}/tcp\s+{LAN_HOST}:8000\s+\d+ s\s+{method}", table), table

    removed = portfwd(
        net, tmp_path, "map", "remove", "8000/tcp", "--external", str(external), "--method", method
    )
    assert removed.returncode == 0, removed.stderr
    assert router_mappings(net) == []
    assert dnat_rules(net, box) == []
    assert reach(net, external, b"x") == ""
    listed = portfwd(net, tmp_path, "map", "list", "--upnp-url", URL, "--json")
    assert (listed.returncode, listed.stdout) == (0, "[]\n"), "crossed off portfwd's list too"


def remove_by_upnp(net: Lab, tmp_path: Path, external: int) -> subprocess.CompletedProcess[str]:
    return portfwd(net, tmp_path, "map", "remove", "8000/tcp", "--external", str(external), "--method", "upnp",
                   "--upnp-url", URL)  # fmt: skip


def test_a_mapping_removed_by_another_method_is_crossed_off(net: Lab, tmp_path: Path) -> None:
    """miniupnpd keeps one table for PCP, NAT-PMP and UPnP: a PCP mapping that UPnP removes is
    gone, and `map list` no longer shows what portfwd wrote down of it."""
    added = portfwd(net, tmp_path, "map", "add", "8000/tcp", "--external", "18040", "--method", "pcp")
    assert added.returncode == 0, added.stderr
    (mine,) = json.loads(portfwd(net, tmp_path, "map", "list", "--method", "pcp", "--json").stdout)
    assert mine["external_port"] == 18040
    removed = remove_by_upnp(net, tmp_path, 18040)
    assert (removed.returncode, removed.stdout) == (0, "removed 18040/tcp (asked upnp)\n"), removed.stderr
    assert router_mappings(net) == []
    listed = portfwd(net, tmp_path, "map", "list", "--method", "pcp", "--json")
    assert (listed.returncode, listed.stdout) == (0, "[]\n")
    # Another mapping of the same port stays written down: only that very one is crossed off.
    added = portfwd(net, tmp_path, "map", "add", "8000/tcp", "--external", "18041", "--method", "pcp")
    assert added.returncode == 0, added.stderr
    other = remove_by_upnp(net, tmp_path, 18042)
    assert other.returncode == 0, other.stderr
    (mine,) = json.loads(portfwd(net, tmp_path, "map", "list", "--method", "pcp", "--json").stdout)
    assert mine["external_port"] == 18041
    removed = portfwd(net, tmp_path, "map", "remove", "8000/tcp", "--external", "18041", "--method", "pcp")
    assert removed.returncode == 0, removed.stderr
    assert router_mappings(net) == []


def test_any_external_port(net: Lab, tmp_path: Path) -> None:
    added = portfwd(
        net, tmp_path, "map", "add", "8000", "--external", "any", "--method", "upnp", "--upnp-url", URL
    )
    assert added.returncode == 0, added.stderr
    public = added.stdout.split("/")[0]
    port = int(public.rsplit(":", 1)[1])
    check_reachable(net, port)
    removed = portfwd(net, tmp_path, "map", "remove", "8000", "--external", str(port), "--method", "upnp")
    assert removed.returncode == 0, removed.stderr


def test_deny_rule_is_one_exact_line(net: Lab, tmp_path: Path) -> None:
    """miniupnpd's `deny` rule covers ports below 1024.

    Only UPnP gets an answer: miniupnpd 2.3.1 meets a denied NAT-PMP/PCP request by trying
    every other external port (one log line each, about 90 s) and never replies in time.
    """
    refused = portfwd(net, tmp_path, "map", "add", "80/tcp", "--method", "upnp", "--upnp-url", URL)
    assert (refused.returncode, refused.stdout, refused.stderr) == (
        1,
        "",
        "portfwd: router refused: UPnP AddPortMapping error 606, Action not authorized "
        "(the router's policy refuses this mapping)\n",
    )


def test_secure_mode_refuses_another_host(net: Lab, tmp_path: Path) -> None:
    refused = portfwd(net, tmp_path, "map", "add", "8000/tcp", "--external", "18010", "--to", "192.168.77.99",
                      "--method", "upnp", "--upnp-url", URL)  # fmt: skip
    assert (refused.returncode, refused.stderr) == (
        1,
        "portfwd: router refused: UPnP AddPortMapping error 718, ConflictInMappingEntry: external port "
        "18010/tcp is taken, or the router's secure mode lets a host map ports only to itself "
        "(asked for 192.168.77.99)\n",
    )
    other = portfwd(net, tmp_path, "map", "add", "8000/tcp", "--to", "192.168.77.99", "--method", "natpmp")
    assert other.stderr == (
        f"portfwd: NAT-PMP maps only this host's ports ({LAN_HOST}), not 192.168.77.99; "
        "use --method upnp to map a port for another host\n"
    )


OTHER_HOST = "192.168.77.11"

SOAP = f"""import http.client, sys
action, body = sys.argv[1], sys.argv[2]
envelope = ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
    's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
    f'<u:{{action}} xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:2">{{body}}</u:{{action}}></s:Body></s:Envelope>')
conn = http.client.HTTPConnection("{GW_LAN}", 5000, timeout=10, source_address=("{OTHER_HOST}", 0))
conn.request("POST", "/ctl/IPConn", envelope, {{"Content-Type": 'text/xml; charset="utf-8"',
    "SOAPAction": f'"urn:schemas-upnp-org:service:WANIPConnection:2#{{action}}"'}})
print(conn.getresponse().status)
"""


def other_host_soap(net: Lab, action: str, body: str) -> str:
    """A SOAP call from a second LAN address: another host, as far as the router can tell."""
    return net.run(net.lan, sys.executable, "-c", SOAP, action, body).stdout.decode().strip()


@pytest.mark.parametrize("method", METHODS)
def test_fixed_port_held_by_another_host(net: Lab, tmp_path: Path, method: str) -> None:
    net.run(net.lan, "ip", "addr", "replace", f"{OTHER_HOST}/24", "dev", "lan0")
    mapping = "<NewRemoteHost></NewRemoteHost><NewExternalPort>18020</NewExternalPort><NewProtocol>TCP</NewProtocol>"
    add = (
        f"{mapping}<NewInternalPort>9000</NewInternalPort><NewInternalClient>{OTHER_HOST}</NewInternalClient>"
        "<NewEnabled>1</NewEnabled><NewPortMappingDescription>other</NewPortMappingDescription>"
        "<NewLeaseDuration>600</NewLeaseDuration>"
    )
    assert other_host_soap(net, "AddPortMapping", add) == "200"
    try:
        clash = portfwd(net, tmp_path, "map", "add", "8000/tcp", "--external", "18020", "--method", method,
                        "--upnp-url", URL)  # fmt: skip
        assert clash.returncode == 1, clash.stdout
        expected = {
            "upnp": "portfwd: router refused: UPnP AddPortMapping error 718, ConflictInMappingEntry: "
            'external port 18020/tcp is already mapped; pick another external port, or use external_port = "any"\n',
            "natpmp": f"portfwd: NAT-PMP at {GW_LAN}:5351: external port 18020/tcp is taken (the router offered ",
            "pcp": f"portfwd: PCP at {GW_LAN}:5351: external port 18020/tcp is taken (the router offered ",
        }[method]
        assert clash.stderr.startswith(expected), clash.stderr
        assert clash.stderr.count("\n") == 1
        (line,) = router_mappings(net)
        assert f"TCP 18020->{OTHER_HOST}:9000" in line, (
            "the other host keeps its port, and no stray mapping is left"
        )
    finally:
        other_host_soap(net, "DeletePortMapping", mapping)


def test_auto_falls_back(home: tuple[Lab, Router], tmp_path: Path) -> None:
    net, box = home
    try:
        box.start(natpmp=False)
        added = portfwd(net, tmp_path, "map", "add", "8000/tcp", "--external", "18030")
        assert added.returncode == 0, added.stderr
        assert added.stdout.endswith(f"via upnp (lease {lease(added.stdout)} s)\n")
        assert lease(added.stdout) in (7199, 7200)
        assert portfwd(net, tmp_path, "map", "remove", "8000/tcp", "--external", "18030").returncode == 0
        box.start(upnp=False)
        added = portfwd(net, tmp_path, "map", "add", "8000/tcp", "--external", "18031")
        assert added.stdout.endswith("via pcp (lease 7200 s)\n"), added.stderr
        assert portfwd(net, tmp_path, "map", "remove", "8000/tcp", "--external", "18031").returncode == 0
    finally:
        box.start()


def run_config(tmp: Path, method: str, port: int, lease: str = "4s") -> Path:
    path = tmp / "map.toml"
    path.write_text(
        f'[control]\nsocket = "{tmp}/ctl.sock"\n[metrics]\nlisten = "127.0.0.1:9930"\n'
        f'[[map]]\nport = 8000\nexternal_port = {port}\nmethod = "{method}"\nlease = "{lease}"\n'
        f'upnp_url = "{URL}"\n'
    )
    return path


def status(net: Lab, tmp: Path, path: Path) -> dict[str, object]:
    out = portfwd(net, tmp, "status", "-c", str(path), "--json")
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


def wait_mapping(
    net: Lab, tmp: Path, path: Path, key: str, least: int, timeout: float = 20
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        (row,) = status(net, tmp, path)["mappings"]  # type: ignore[misc]
        if row["state"] == "up" and row[key] >= least:
            return row  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"mapping never reached {key} >= {least}: {row}"
        time.sleep(0.2)


@pytest.mark.parametrize("method", METHODS)
def test_run_renews_survives_reboot_and_removes_on_exit(
    home: tuple[Lab, Router], tmp_path: Path, method: str
) -> None:
    net, box = home
    external = 18040 + METHODS.index(method)
    path = run_config(tmp_path, method, external)
    argv = ["ip", "netns", "exec", net.lan, sys.executable, "-m", "portfwd", "run", "-c", str(path)]
    proc = Proc(argv, env=env(tmp_path, PORTFWD_MAP_CHECK="1"), cwd=REPO)
    try:
        proc.wait_for(READY)
        proc.wait_for(f"published at {GW_WAN}:{external} via {method}")
        # A 4 s lease renewed every 2 s: after 3 renewals (> 4 s) it is still there.
        row = wait_mapping(net, tmp_path, path, "renewals", 3)
        assert (row["method"], row["external"], row["internal"]) == (
            method,
            f"{GW_WAN}:{external}",
            f"{LAN_HOST}:8000",
        )
        assert any(f"TCP {external}->" in line for line in router_mappings(net)), "the router still holds it"
        check_reachable(net, external)
        listed = json.loads(portfwd(net, tmp_path, "map", "list", "--upnp-url", URL, "--json").stdout)
        assert [(row["external_port"], row["ours"], row["method"]) for row in listed] == [
            (external, True, method)
        ], "map list in another shell marks what portfwd run holds"
        table = portfwd(net, tmp_path, "status", "-c", str(path)).stdout
        assert "router mappings" in table
        assert re.search(
            rf"map\[0\] tcp\s+{method}\s+up\s+{LAN_HOST}:8000\s+{GW_WAN}:{external}\s+\d+s\s+\d+", table
        ), table
        metrics = net.run(net.lan, "curl", "-s", "http://127.0.0.1:9930/metrics").stdout.decode()
        assert f'portfwd_mapping_up{{mapping="map[0] tcp",method="{method}"}} 1.0' in metrics
        assert 'portfwd_mapping_lease_seconds{mapping="map[0] tcp"}' in metrics

        mark = proc.mark()
        box.start()  # a router reboot: new process, empty lease file, its nft table recreated empty
        # A renewal finds the mapping gone ("made it again"), or, when it falls while the router
        # is still down, fails and maps anew ("published"); either way it is back.
        again = proc.wait_for(f" at {GW_WAN}:{external}", start=mark)
        assert (
            f"the router lost mapping 8000/tcp (restarted?); made it again at {GW_WAN}:{external}" in again
            or f"8000/tcp published at {GW_WAN}:{external} via {method}" in again
        ), again
        check_reachable(net, external)
    finally:
        proc.stop()
        proc.close()
    assert f"mapping {GW_WAN}:{external} removed from the router" in "\n".join(proc.lines)
    assert router_mappings(net) == []
    assert dnat_rules(net, box) == []


def test_forward_rule_publishes_its_port(net: Lab, tmp_path: Path) -> None:
    """`map = true` on a [[forward]]: the relay's own listen port is published, and removed at exit."""
    path = tmp_path / "fwd.toml"
    path.write_text(
        '[control]\nenabled = false\n[[forward]]\nlisten = "0.0.0.0:18050"\nconnect = "127.0.0.1:8000"\n'
        "map = true\n"
    )
    argv = ["ip", "netns", "exec", net.lan, sys.executable, "-m", "portfwd", "run", "-c", str(path)]
    proc = Proc(argv, env=env(tmp_path), cwd=REPO)
    try:
        proc.wait_for(f"published at {GW_WAN}:18050 via pcp")
        data = os.urandom(64 * 1024)
        reply = reach(net, 18050, data)
        assert reply.splitlines() == ["peer=127.0.0.1", f"{hashlib.sha256(data).hexdigest()}  -"]
    finally:
        proc.stop()
        proc.close()
    assert router_mappings(net) == []


def test_a_refused_mapping_is_retried_and_shown_while_the_other_runs(net: Lab, tmp_path: Path) -> None:
    path = tmp_path / "two.toml"
    path.write_text(
        f'[control]\nsocket = "{tmp_path}/ctl.sock"\n'
        f'[[map]]\nport = 80\nmethod = "upnp"\nupnp_url = "{URL}"\n'
        f'[[map]]\nport = 8000\nexternal_port = 18060\nmethod = "upnp"\nupnp_url = "{URL}"\n'
    )
    argv = ["ip", "netns", "exec", net.lan, sys.executable, "-m", "portfwd", "run", "-c", str(path)]
    proc = Proc(argv, env=env(tmp_path), cwd=REPO)
    try:
        proc.wait_for(f"map[1]: 8000/tcp published at {GW_WAN}:18060 via upnp")
        proc.wait_for("map[0]: router refused: UPnP AddPortMapping error 606")
        check_reachable(net, 18060)
        refused, good = status(net, tmp_path, path)["mappings"]  # type: ignore[misc]
        assert (refused["state"], good["state"]) == ("retrying", "up")
        assert refused["last_error"].startswith("router refused: UPnP AddPortMapping error 606")
    finally:
        proc.stop()
        proc.close()
    assert router_mappings(net) == []
