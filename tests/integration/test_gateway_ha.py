"""Gateway HA: keepalived + conntrackd on two gateways; a long TCP transfer survives a failover.

    wan 203.0.113.20 ─┐ [sw: brwan] ┌─ gw1 wan .2 ─┐ sync 10.77.0.1/30 ┌ gw1 lan .2 ─┐ [sw: brlan] ┌─ lan 192.168.77.10
                      └─────────────┴─ gw2 wan .3 ─┘ sync 10.77.0.2/30 └ gw2 lan .3 ─┴─────────────┘
    virtual addresses: 203.0.113.1/24 (WAN), 192.168.77.1/24 (LAN, the server's default route)

The WAN client downloads a paced stream from the LAN server through the WAN virtual address
(DNAT 8080 -> 80). While it runs, the master's WAN and LAN ports are cut on the switch (the
master sees no carrier, keepalived turns FAULT), the backup takes the addresses, commits the
NAT state conntrackd copied to it, and the stream goes on: same sha256, no byte missing.
`nf_conntrack_tcp_loose=0` on both gateways, so a backup cannot pick the flow up by itself
(TESTBED §7): without conntrackd's state the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import need_binary, need_root
from tests.integration.processes import READY, REPO, Proc

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.netns]

WAN_HOST, WAN_VIP = "203.0.113.20", "203.0.113.1"
LAN_HOST, LAN_VIP = "192.168.77.10", "192.168.77.1"
SYNC = {"gw1": "10.77.0.1", "gw2": "10.77.0.2"}
ADDRESSES = {"gw1": ("203.0.113.2", "192.168.77.2"), "gw2": ("203.0.113.3", "192.168.77.3")}
PRIORITY = {"gw1": 150, "gw2": 100}
ADVERT = 0.3
SIZE, RATE = 24 * 2**20, 3 * 2**20  # 8 s of stream, long enough to span the failover
GAP = 0.1  # the stream sends a chunk every ~20 ms: a longer silence is the failover

#: What the lead's plan must produce with [gateway.ha] (see README "## Gateway" and the report):
#: DNAT on the WAN virtual address, SNAT to it, and invalid packets dropped before the router's
#: own stack answers them with a reset.
RULESET = f"""
table inet portfwd {{
  map dnat_tcp {{ type inet_service : ipv4_addr . inet_service; elements = {{ 8080 : {LAN_HOST} . 80 }} }}
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;
    iifname "wan" fib daddr . iif type local counter dnat ip to tcp dport map @dnat_tcp
  }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;
    iifname "lan" oifname "wan" meta nfproto ipv4 counter snat ip to {WAN_VIP}
  }}
  chain input {{ type filter hook input priority filter; policy accept;
    ct state invalid counter drop
  }}
  chain forward {{ type filter hook forward priority filter; policy accept;
    ct state invalid counter drop
    ct status dnat counter accept
  }}
}}
"""

#: Runs HASupervisor inside a gateway namespace, as `portfwd run` will; prints its role changes.
DRIVER = """
import asyncio, contextlib, ipaddress, json, logging, signal, sys, time
from portfwd.kernel.hasupervisor import HASupervisor
from portfwd.specs import GatewayHASpec, GatewaySpec
logging.basicConfig(level=logging.INFO, format="log %(message)s", stream=sys.stdout)
args = json.loads(sys.argv[1])
vips = tuple(ipaddress.IPv4Interface(v) for v in args["vips"])
ha = GatewayHASpec(args["peer"], vips, "sync", priority=args["priority"], advert_interval=args["advert"])
spec = GatewaySpec(wan="wan", lan="lan", ha=ha)
async def main():
    sup = HASupervisor(spec, args["dir"], die_with_parent=args.get("die_with_parent", True))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await sup.start()
    except Exception as exc:
        print(f"ha failed: {exc}", flush=True)
        return
    print("ha ready", flush=True)
    async def reload():
        try:
            await sup.reload()
            print("ha reloaded", flush=True)
        except Exception as exc:
            print(f"ha reload failed: {exc}", flush=True)
    tasks = set()
    def on_hup():
        tasks.add(asyncio.ensure_future(reload()))
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_hup)
    last = dead = None
    while not stop.is_set():
        if (now := sup.alive()) != dead:
            print(f"alive {now}", flush=True)
            dead = now
        if (role := sup.role()) != last:
            print(f"role {role} {time.monotonic():.3f}", flush=True)
            last = role
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)
    problems = await sup.stop()
    print("ha stopped" + (f" with problems: {problems}" if problems else ""), flush=True)
asyncio.run(main())
"""

#: LAN server: one client, SIZE random bytes paced at RATE, then its sha256.
SERVER = """
import hashlib, os, socket, sys, time
size, rate = int(sys.argv[1]), float(sys.argv[2])
listener = socket.create_server(("0.0.0.0", 80))
print("listening", flush=True)
listener.settimeout(60)
conn, peer = listener.accept()
conn.settimeout(60)
print(f"peer {peer[0]}", flush=True)
digest, sent, start = hashlib.sha256(), 0, time.monotonic()
while sent < size:
    chunk = os.urandom(min(65536, size - sent))
    conn.sendall(chunk)
    digest.update(chunk)
    sent += len(chunk)
    ahead = start + sent / rate - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
conn.shutdown(socket.SHUT_WR)
conn.recv(1)
print(f"sent {sent} {digest.hexdigest()}", flush=True)
"""

#: WAN client: reads to EOF; prints bytes, sha256 and every silence longer than GAP.
CLIENT = """
import hashlib, json, socket, sys, time
host, port, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sock = socket.create_connection((host, port), timeout=5)
sock.settimeout(60)
print("connected", flush=True)
digest, total, last, gaps = hashlib.sha256(), 0, time.monotonic(), []
while True:
    data = sock.recv(262144)
    now = time.monotonic()
    if not data:
        break
    if now - last > gap:
        gaps.append((last, now))
    digest.update(data)
    total += len(data)
    last = now
print("result " + json.dumps({"bytes": total, "sha256": digest.hexdigest(), "gaps": gaps}), flush=True)
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _exec(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=30, check=False
    )


@dataclass
class HALab:
    ns: dict[str, str]  # role (wan, lan, gw1, gw2, sw) -> namespace name
    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, role: str, *argv: str) -> Proc:
        proc = Proc(["ip", "netns", "exec", self.ns[role], *argv], cwd=REPO)
        self.procs.append(proc)
        return proc

    def cut(self, gw: str, down: bool = True) -> None:
        """Pull (or plug back) the gateway's WAN and LAN cables: its switch ports go down."""
        for port in (f"{gw}w", f"{gw}l"):
            _ip("-n", self.ns["sw"], "link", "set", port, "down" if down else "up")

    def has_address(self, gw: str, dev: str, address: str) -> bool:
        out = _exec(self.ns[gw], "ip", "-o", "-4", "addr", "show", "dev", dev).stdout
        return f" {address}/" in out


def _veth(a_ns: str, a: str, b_ns: str, b: str) -> None:
    _ip("link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b, "netns", b_ns)


@contextlib.contextmanager
def ha_lab() -> Iterator[HALab]:
    need_root()
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        need_binary(tool, package)
    need_binary("keepalived", "keepalived")
    need_binary("conntrackd", "conntrackd")
    prefix = f"pft-{uuid.uuid4().hex[:8]}"
    names = {role: f"{prefix}-{role}" for role in ("wan", "lan", "gw1", "gw2", "sw")}
    created: list[str] = []
    lab = HALab(names, Path(tempfile.mkdtemp(prefix="pft-ha-")))
    try:
        for ns in names.values():
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _exec(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            _exec(ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        sw = names["sw"]
        for bridge in ("brwan", "brlan"):
            _ip("-n", sw, "link", "add", bridge, "type", "bridge")
            _ip("-n", sw, "link", "set", bridge, "up")
        _veth(names["wan"], "wan0", sw, "hostw")
        _veth(names["lan"], "lan0", sw, "hostl")
        for gw in ("gw1", "gw2"):
            _veth(names[gw], "wan", sw, f"{gw}w")
            _veth(names[gw], "lan", sw, f"{gw}l")
        _veth(names["gw1"], "sync", names["gw2"], "sync")
        for port, bridge in (("hostw", "brwan"), ("hostl", "brlan"), ("gw1w", "brwan"), ("gw2w", "brwan")):
            _ip("-n", sw, "link", "set", port, "master", bridge)
        for port in ("gw1l", "gw2l"):
            _ip("-n", sw, "link", "set", port, "master", "brlan")
        for port in ("hostw", "hostl", "gw1w", "gw1l", "gw2w", "gw2l"):
            _ip("-n", sw, "link", "set", port, "up")
        links = [
            (names["wan"], "wan0", f"{WAN_HOST}/24"),
            (names["lan"], "lan0", f"{LAN_HOST}/24"),
        ]
        for gw in ("gw1", "gw2"):
            wan, lan = ADDRESSES[gw]
            links += [
                (names[gw], "wan", f"{wan}/24"),
                (names[gw], "lan", f"{lan}/24"),
                (names[gw], "sync", f"{SYNC[gw]}/30"),
            ]
        for ns, dev, address in links:
            _ip("-n", ns, "addr", "add", address, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", names["lan"], "route", "add", "default", "via", LAN_VIP)
        for gw in ("gw1", "gw2"):
            for setting in ("net.ipv4.ip_forward=1", "net.netfilter.nf_conntrack_tcp_loose=0"):
                done = _exec(names[gw], "sysctl", "-qw", setting)
                assert done.returncode == 0, done.stderr
        yield lab
    finally:
        for proc in reversed(lab.procs):
            proc.stop()
            proc.close()
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False, timeout=30)
        with contextlib.suppress(OSError):
            for path in sorted(lab.tmp.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            lab.tmp.rmdir()


def load_ruleset(lab: HALab, gw: str) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", lab.ns[gw], "nft", "-f", "-"],
        input=RULESET,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def start_ha(lab: HALab, gw: str, die_with_parent: bool = True) -> Proc:
    other = "gw2" if gw == "gw1" else "gw1"
    args = {
        "peer": SYNC[other],
        "vips": [f"{WAN_VIP}/24", f"{LAN_VIP}/24"],
        "priority": PRIORITY[gw],
        "advert": ADVERT,
        "dir": str(lab.tmp / gw),
        "die_with_parent": die_with_parent,
    }
    proc = lab.start(gw, sys.executable, "-c", DRIVER, json.dumps(args))
    proc.wait_for("ha ready", timeout=20)
    return proc


def wait_until(check: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout:g}s: {what}")
        time.sleep(0.05)


def role_at(line: str) -> float:
    return float(line.split()[-1])


@dataclass
class Failover:
    seconds: float
    lost: int
    bytes: int
    same: bool


def transfer_across_failover(
    lab: HALab, ha: dict[str, Proc] | None, inbound: bool, backup_conf: Path | None = None
) -> Failover:
    """Stream through gw1 and cut it mid-stream; what arrived.

    inbound: a WAN client downloads from the LAN server via the WAN virtual address (DNAT);
    else a LAN client downloads from a WAN server (SNAT to the WAN virtual address).
    """
    if inbound:
        server_ns, client_ns, target, port, seen = "lan", "wan", WAN_VIP, "8080", WAN_HOST
    else:
        server_ns, client_ns, target, port, seen = "wan", "lan", WAN_HOST, "80", WAN_VIP
    server = lab.start(server_ns, sys.executable, "-c", SERVER, str(SIZE), str(RATE))
    server.wait_for("listening", timeout=10)
    client = lab.start(client_ns, sys.executable, "-c", CLIENT, target, port, str(GAP))
    client.wait_for("connected", timeout=10)
    assert server.wait_for("peer ", timeout=10).split()[-1] == seen
    # the backup holds the flow in conntrackd's external cache before the cut
    ctl = ["conntrackd", "-C", str(backup_conf or lab.tmp / "gw2" / "conntrackd.conf"), "-e", "ct"]
    wait_until(
        lambda: f"dport={port} " in _exec(lab.ns["gw2"], *ctl).stdout,
        "the flow in gw2's external cache",
    )
    time.sleep(1.0)  # let the stream run a while before the cut; the cut must hit a busy flow
    marks = {gw: proc.mark() for gw, proc in (ha or {}).items()}
    cut = time.monotonic()
    lab.cut("gw1")
    if ha is not None:  # driven directly: the supervisors print their roles
        assert role_at(ha["gw1"].wait_for("role fault", timeout=10, start=marks["gw1"])) >= cut
        assert role_at(ha["gw2"].wait_for("role master", timeout=10, start=marks["gw2"])) >= cut
    wait_until(lambda: lab.has_address("gw2", "wan", WAN_VIP), "the WAN virtual address on gw2")
    assert lab.has_address("gw2", "wan", WAN_VIP)
    assert lab.has_address("gw2", "lan", LAN_VIP)
    assert not lab.has_address("gw1", "wan", WAN_VIP)
    result = json.loads(client.wait_for("result ", timeout=60).split(" ", 1)[1])
    sent = server.wait_for("sent ", timeout=30).split()
    resumed = [end for start, end in result["gaps"] if end > cut]
    seconds = (min(resumed) - cut) if resumed else 0.0
    return Failover(seconds, int(sent[1]) - result["bytes"], result["bytes"], result["sha256"] == sent[2])


@pytest.mark.parametrize("inbound", [True, False], ids=["wan-to-lan-dnat", "lan-to-wan-snat"])
def test_transfer_survives_failover_with_conntrackd_state(inbound: bool) -> None:
    with ha_lab() as lab:
        for gw in ("gw1", "gw2"):
            load_ruleset(lab, gw)
        ha = {"gw1": start_ha(lab, "gw1")}
        ha["gw1"].wait_for("role master", timeout=15)
        ha["gw2"] = start_ha(lab, "gw2")
        ha["gw2"].wait_for("role backup", timeout=15)
        assert lab.has_address("gw1", "wan", WAN_VIP)
        assert lab.has_address("gw1", "lan", LAN_VIP)
        assert not lab.has_address("gw2", "wan", WAN_VIP)

        outcome = transfer_across_failover(lab, ha, inbound)
        print(
            f"\nHA failover: {outcome.seconds * 1000:.0f} ms from cut to data,"
            f" {outcome.lost} bytes lost of {outcome.bytes + outcome.lost}"
        )
        assert outcome.same
        assert outcome.lost == 0
        assert outcome.seconds < 5

        # a reload (SIGHUP to keepalived) keeps the master's role and addresses
        mark = ha["gw2"].mark()
        ha["gw2"].popen.send_signal(signal.SIGHUP)
        ha["gw2"].wait_for("ha reloaded", timeout=15, start=mark)
        assert lab.has_address("gw2", "wan", WAN_VIP)

        # gw1 comes back as backup: nopreempt, no second interruption
        mark = ha["gw1"].mark()
        lab.cut("gw1", down=False)
        ha["gw1"].wait_for("role backup", timeout=15, start=mark)
        assert lab.has_address("gw2", "wan", WAN_VIP)

        for gw in ("gw1", "gw2"):
            ha[gw].stop()
            assert ha[gw].wait_for("ha stopped") == "ha stopped", "stop() met problems"
            assert not (lab.tmp / gw).exists(), "HASupervisor.stop() left files behind"
        assert not lab.has_address("gw2", "wan", WAN_VIP), "a virtual address outlived keepalived"
        for gw in ("gw1", "gw2"):
            assert _pids_in(lab.ns[gw]) == [], f"processes left in {gw}"


def _pids_in(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    return [int(pid) for pid in re.findall(r"\d+", out.stdout)]


def _engines(ns: str) -> list[tuple[int, str]]:
    """(pid, name) of the keepalived and conntrackd processes running in `ns`, by cmdline."""
    found = []
    for pid in _pids_in(ns):
        with contextlib.suppress(OSError):
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            if (name := os.path.basename(os.fsdecode(argv0))) in ("keepalived", "conntrackd"):
                found.append((pid, name))
    return found


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie that nobody reaped yet has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _stopped_cleanly(lab: HALab, proc: Proc) -> None:
    proc.stop()
    assert proc.wait_for("ha stopped") == "ha stopped", "stop() met problems"
    assert _pids_in(lab.ns["gw1"]) == [], "processes left in gw1"
    assert not lab.has_address("gw1", "wan", WAN_VIP), "a virtual address outlived keepalived"
    assert not lab.has_address("gw1", "lan", LAN_VIP), "a virtual address outlived keepalived"
    assert not (lab.tmp / "gw1").exists(), "HASupervisor.stop() left files behind"


def test_engines_die_with_a_killed_portfwd() -> None:
    """PR_SET_PDEATHSIG: SIGKILL the process that runs the supervisor; keepalived and conntrackd
    go too (keepalived giving its addresses up), and the next start finds a clean directory."""
    with ha_lab() as lab:
        first = start_ha(lab, "gw1")
        first.wait_for("role master", timeout=15)
        engines = _engines(lab.ns["gw1"])
        assert {name for _, name in engines} == {"keepalived", "conntrackd"}
        first.stop(signal.SIGKILL)
        wait_until(lambda: not any(_running(pid) for pid, _ in engines), "the engines exiting with portfwd")
        wait_until(lambda: not lab.has_address("gw1", "wan", WAN_VIP), "the virtual address going")
        second = start_ha(lab, "gw1")
        second.wait_for("role master", timeout=15)
        _stopped_cleanly(lab, second)


@pytest.mark.parametrize("left", ["running", "killed"])
def test_start_takes_over_what_a_killed_portfwd_left(left: str) -> None:
    """Engines that outlived their portfwd (started without PR_SET_PDEATHSIG, as an older portfwd
    did) still hold the virtual addresses and port 3780: the next start stops them (found by
    their pid files and cmdline), or, when they were killed, removes the addresses they left."""
    with ha_lab() as lab:
        first = start_ha(lab, "gw1", die_with_parent=False)
        first.wait_for("role master", timeout=15)
        orphans = _engines(lab.ns["gw1"])
        assert {name for _, name in orphans} == {"keepalived", "conntrackd"}
        first.stop(signal.SIGKILL)
        assert all(_running(pid) for pid, _ in orphans), "the engines did not outlive their portfwd"
        assert lab.has_address("gw1", "wan", WAN_VIP)
        if left == "killed":
            # the VRRP child first, so no keepalived is left to give the addresses up
            for pid, _ in sorted(orphans, reverse=True):
                os.kill(pid, signal.SIGKILL)  # ours: found by cmdline in our namespace
            wait_until(lambda: not any(_running(pid) for pid, _ in orphans), "the engines killed")
            assert lab.has_address("gw1", "wan", WAN_VIP), "nothing left for the next start to remove"
        second = start_ha(lab, "gw1")
        second.wait_for("role master", timeout=15)
        assert not any(_running(pid) for pid, _ in orphans), "the old engines still run"
        engines = _engines(lab.ns["gw1"])
        assert {name for _, name in engines} == {"keepalived", "conntrackd"}
        assert not {pid for pid, _ in engines} & {pid for pid, _ in orphans}
        if left == "running":
            second.wait_for("was left running by a portfwd that did not stop; stopping it")
        else:
            second.wait_for(f"removed virtual address {WAN_VIP}/24 from wan")
        _stopped_cleanly(lab, second)


def test_a_dead_engine_is_reported_and_makes_the_role_fault() -> None:
    with ha_lab() as lab:
        proc = start_ha(lab, "gw1")
        proc.wait_for("role master", timeout=15)
        mark = proc.mark()
        [pid] = [pid for pid, name in _engines(lab.ns["gw1"]) if name == "conntrackd"]
        os.kill(pid, signal.SIGKILL)  # ours: found by cmdline in our namespace
        line = proc.wait_for("alive gateway.ha: conntrackd", timeout=10, start=mark)
        assert line.startswith(f"alive gateway.ha: conntrackd (pid {pid}) was killed by SIGKILL")
        proc.wait_for("role fault", timeout=10, start=mark)
        _stopped_cleanly(lab, proc)


def test_start_failure_names_the_cause_and_leaves_nothing() -> None:
    with ha_lab() as lab:
        args = {"peer": "10.99.0.9", "vips": [f"{WAN_VIP}/24"], "priority": 100, "advert": 1.0}
        args["dir"] = str(lab.tmp / "gw1")
        proc = lab.start("gw1", sys.executable, "-c", DRIVER, json.dumps(args))
        line = proc.wait_for("ha failed: ", timeout=20)
        assert line == (
            "ha failed: gateway.ha.peer: 10.99.0.9 is not on sync (10.77.0.0/30);"
            " the routers must share the sync link"
        )
        assert proc.popen.wait(10) == 0
        assert not (lab.tmp / "gw1").exists()
        assert _pids_in(lab.ns["gw1"]) == []


def _wired() -> bool:
    """Whether `portfwd run` runs HA yet (the lead wires kernel/hasupervisor.py into it)."""
    source = (REPO / "src/portfwd/kernel/gateway.py").read_text()
    return "hasupervisor" in source or "HASupervisor" in source


def ha_config(path: Path, gw: str) -> None:
    other = "gw2" if gw == "gw1" else "gw1"
    path.write_text(
        '[control]\nenabled = false\n[gateway]\nwan = "wan"\nlan = "lan"\n'
        f'[[gateway.forward]]\nport = 8080\nto = "{LAN_HOST}:80"\n'
        f'[gateway.ha]\npeer = "{SYNC[other]}"\nsync_interface = "sync"\n'
        f'virtual_addresses = ["{WAN_VIP}/24", "{LAN_VIP}/24"]\n'
        f"priority = {PRIORITY[gw]}\nadvert_interval = {ADVERT}\n"
    )


@pytest.mark.parametrize("inbound", [True, False], ids=["wan-to-lan-dnat", "lan-to-wan-snat"])
def test_portfwd_run_with_gateway_ha_survives_failover(inbound: bool) -> None:
    if not _wired():
        pytest.skip("portfwd run does not run [gateway.ha] yet (kernel/gateway.py does not use HASupervisor)")
    with ha_lab() as lab:
        runs: dict[str, Proc] = {}
        for gw in ("gw1", "gw2"):
            home = lab.tmp / f"portfwd-{gw}"  # each router its own runtime and state directory
            home.mkdir()
            config = home / "portfwd.toml"
            ha_config(config, gw)
            env = {
                **os.environ,
                "PORTFWD_RUNTIME_DIR": str(home / "run"),
                "PORTFWD_STATE_DIR": str(home / "state"),
            }
            proc = Proc(
                [
                    "ip",
                    "netns",
                    "exec",
                    lab.ns[gw],
                    sys.executable,
                    "-m",
                    "portfwd",
                    "run",
                    "-c",
                    str(config),
                ],
                env=env,
                cwd=REPO,
            )
            lab.procs.append(proc)
            runs[gw] = proc
            proc.wait_for(READY, timeout=30)
            if gw == "gw1":
                wait_until(lambda: lab.has_address("gw1", "wan", WAN_VIP), "gw1 master")
        backup_conf = next((lab.tmp / "portfwd-gw2").rglob("conntrackd.conf"))
        outcome = transfer_across_failover(lab, None, inbound, backup_conf)
        print(
            f"\nHA failover through portfwd run: {outcome.seconds * 1000:.0f} ms from cut to data,"
            f" {outcome.lost} bytes lost of {outcome.bytes + outcome.lost}"
        )
        assert outcome.same
        assert outcome.lost == 0
        for gw in ("gw1", "gw2"):
            assert runs[gw].stop() == 0, runs[gw].output()
            assert _pids_in(lab.ns[gw]) == [], f"processes left in {gw}"
            assert "portfwd" not in _exec(lab.ns[gw], "nft", "list", "tables").stdout
        assert not lab.has_address("gw2", "wan", WAN_VIP), "a virtual address outlived portfwd"
