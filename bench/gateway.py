"""Gateway benchmark: kernel DNAT (portfwd's nft table) beside direct routing and beside portfwd's
userspace relay on the same gw, in the lan / gw / wan namespace lab (needs root).

One run, interleaved rounds, medians: iperf3 bulk Gbit/s wan -> lan, conn/s of small HTTP
requests (wrk, one connection each) at 10 and at 1,000 forwarded ports, and the time `apply`
takes for 1,000 forwarded ports.

Usage: .venv/bin/python bench/gateway.py [--rounds N] [--seconds S] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "src"))

from tests.integration.netns import wait_listening_in  # noqa: E402
from tests.integration.processes import Proc  # noqa: E402
from tests.integration.topology import GW_WAN, LAN_HOST, Lab, lab  # noqa: E402

import run as base  # noqa: E402  (bench/run.py: the wrk command and its report)
from portfwd import config, planner  # noqa: E402
from portfwd.kernel import gwplan, nft  # noqa: E402
from portfwd.specs import GatewaySpec  # noqa: E402

MARKER = "\n## Gateway (issue #7)"


def gateway(ports: int) -> GatewaySpec:
    forwards = [{"port": 8080, "to": f"{LAN_HOST}:8000"}, {"port": 5201, "to": f"{LAN_HOST}:5201"}]
    forwards += [{"port": 20000 + i, "to": f"{LAN_HOST}:{30000 + i}"} for i in range(ports - 2)]
    loaded = config.validate({"gateway": {"wan": "gwwan0", "lan": "gwlan0", "forward": forwards}}).gateway
    assert loaded is not None
    return planner.gateway_spec(loaded)  # the kernel layer takes the frozen spec, not the model


def apply_in_gw(net: Lab, ports: int) -> float:
    """Apply the plan for `ports` forwards inside gw; return the seconds `nft -f` took."""
    interfaces = gwplan.Interfaces((GW_WAN,), (gwplan.Network("192.168.77.0/24"),))
    document = nft.document(gwplan.plan(gateway(ports), interfaces))
    began = time.perf_counter()
    result = net.run(net.gw, "nft", "-f", "-", data=document.encode())
    took = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"nft: {result.stderr.decode()}")
    return took


def iperf(net: Lab, host: str, port: int, seconds: int) -> float:
    out = net.run(
        net.wan, "iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J", timeout=seconds + 30
    )
    return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


def wrk(net: Lab, host: str, port: int, seconds: int) -> float:
    out = net.run(net.wan, *base.wrk_argv(f"http://{host}:{port}/", seconds), timeout=seconds + 30)
    return base.wrk_rate(out.stdout.decode())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md")
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    with lab() as net, tempfile.TemporaryDirectory(prefix="pf-bench-gw-") as tmp:
        origin = Path(tmp) / "origin.cfg"
        origin.write_text(
            "global\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n"
            "  timeout server 30s\nfrontend origin\n  bind :8000\n  bind :8001\n  bind :8002\n"
            '  http-request return status 200 content-type text/plain string "ok"\n'
        )
        peers = [
            Proc(["ip", "netns", "exec", net.lan, "iperf3", "-s", "-p", "5201"]),
            Proc(["ip", "netns", "exec", net.lan, "haproxy", "-f", str(origin), "-db"]),
        ]
        relay_config = Path(tmp) / "relay.toml"
        # relay = "splice": as root in gw with forwarding on, "auto" would give these rules to
        # the kernel, and "portfwd relay" would measure a second DNAT instead of userspace
        relay_config.write_text(
            "[control]\nenabled = false\n"
            f'[[forward]]\nlisten = "{GW_WAN}:15201"\nconnect = "{LAN_HOST}:5201"\nrelay = "splice"\n'
            f'[[forward]]\nlisten = "{GW_WAN}:18080"\nconnect = "{LAN_HOST}:8002"\nrelay = "splice"\n'
        )
        peers.append(
            Proc(
                [
                    "ip",
                    "netns",
                    "exec",
                    net.gw,
                    str(HERE.parent / ".venv/bin/portfwd"),
                    "run",
                    "-q",
                    "-c",
                    str(relay_config),
                ]
            )
        )
        net.procs.extend(peers)
        # direct routing: wan gets a route to the LAN through gw (no NAT needed for this path)
        net.run(net.wan, "ip", "route", "add", "192.168.77.0/24", "via", GW_WAN)
        for ns, port in ((net.lan, 5201), (net.lan, 8000), (net.gw, 15201), (net.gw, 18080)):
            wait_listening_in(ns, port)
        results["apply 1,000 ports (s)"] = [apply_in_gw(net, 1000) for _ in range(args.rounds)]
        paths = {
            # each path reaches its own origin port: TIME_WAIT tuples on the LAN server from one
            # path's tens of thousands of connections must not slow the next path down
            "direct routing": (LAN_HOST, 5201, 8001),
            "kernel DNAT": (GW_WAN, 5201, 8080),
            "portfwd relay": (GW_WAN, 15201, 18080),
        }
        for ports in (10, 1000):
            apply_in_gw(net, ports)
            for _ in range(args.rounds):
                results.setdefault(f"conn/s DNAT, {ports} ports", []).append(
                    wrk(net, GW_WAN, 8080, args.seconds)
                )
        for _ in range(args.rounds):
            for name, (host, bulk_port, http_port) in paths.items():
                results.setdefault(f"bulk {name}", []).append(iperf(net, host, bulk_port, args.seconds))
                results.setdefault(f"conn/s {name}", []).append(wrk(net, host, http_port, args.seconds))
        net.run(net.gw, "nft", "delete", "table", "inet", "portfwd")
    table = {name: statistics.median(values) for name, values in results.items()}
    report = render(table, args)
    print(report)
    if args.write:
        path = HERE / "RESULTS.md"
        old = path.read_text() if path.exists() else ""
        if MARKER in old:
            start = old.index(MARKER)
            end = old.find("\n## ", start + len(MARKER))
            old = old[:start] + (old[end:] if end >= 0 else "")
        path.write_text(old.rstrip("\n") + "\n" + report)
    return 0


def render(table: dict[str, float], args: argparse.Namespace) -> str:
    lines = [
        MARKER.strip(),
        "",
        f"Measured {datetime.date.today().isoformat()} by `bench/gateway.py --rounds {args.rounds} --seconds {args.seconds}`"
        " in the lan / gw / wan veth lab (wan -> lan), medians.",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value:,.3f} |" for name, value in table.items()]
    direct = table["bulk direct routing"]
    lines += [
        "",
        "| ratio | value | goal |",
        "|---|---|---|",
        f"| DNAT bulk vs direct routing | {table['bulk kernel DNAT'] / direct:.2f} | ≥ 0.95 |",
        f"| DNAT conn/s, 1,000 ports vs 10 | {table['conn/s DNAT, 1000 ports'] / table['conn/s DNAT, 10 ports']:.2f} | ≥ 0.95 |",
        f"| apply of 1,000 ports | {table['apply 1,000 ports (s)']:.3f} s | ≤ 1 s |",
        f"| DNAT bulk vs portfwd relay | {table['bulk kernel DNAT'] / table['bulk portfwd relay']:.2f} | (context) |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
