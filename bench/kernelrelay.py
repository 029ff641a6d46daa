"""Kernel relay benchmark (issue #23): `relay = "kernel"` beside direct routing, a hand-written
nft ruleset of the same shape, haproxy at its best and portfwd's splice relay, in the lan / gw /
wan namespace lab (needs root).

One run, interleaved rounds (order shuffled per round), medians. The client is in wan, the
servers (iperf3, an haproxy HTTP origin) in lan, every forwarder in gw. Each NAT configuration is
loaded only while it is measured (a portfwd kernel relay is started and stopped around its
measurements, the hand-written table loaded and deleted) and gw's conntrack table is flushed
after it, so no path pays for another's rules or leftover flows. Userspace forwarders (haproxy,
portfwd splice) listen throughout: a socket costs other paths nothing.

Measures: bulk (iperf3 -J, 1 and 4 streams, Gbit/s wan -> lan), conn/s (wrk, one connection per
HTTP request, `Connection: close`) and the whole box's CPU for each (all processes and softirq,
so it counts the client and the servers too, and any other load on the machine). The kernel
relay is also measured with 10 and 1,000 `[[forward]]` rules, the measured rules last (the
flatness check: every packet's work must not grow with the rules); listening on 0.0.0.0
(every IPv4 address); and as its table alone, loaded with nft and no portfwd process (the
ruleset's own cost beside the hand-written one, without portfwd reading its counters and flows).

Usage: .venv/bin/python bench/kernelrelay.py [--rounds N] [--seconds S] [--listen HOST] [--write]
Needs: iperf3, wrk, haproxy, nft, conntrack (apt-get install iperf3 wrk haproxy nftables conntrack).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.integration.topology import GW_WAN, LAN_HOST, Lab, lab  # noqa: E402

import run as base  # noqa: E402  (bench/run.py: the wrk command, its report, NaN-safe median)
from portfwd.addr import parse_listen  # noqa: E402
from portfwd.kernel import relay  # noqa: E402
from portfwd.specs import RuleSpec  # noqa: E402

MARKER = "\n## Kernel relay (issue #23)"
PORTFWD = REPO / ".venv/bin/portfwd"
TICK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
IPERF = 5201  # the one iperf3 server in lan; every path reaches it
LAN_NET = "192.168.77.0/24"
#: Origin ports in lan, one per path: the TIME_WAIT sockets one path's tens of thousands of
#: connections leave on the origin must not slow the next path down.
ORIGIN_PORTS = range(8000, 8012)
HAND_TABLE = "kr_hand"
KERNEL_RULES = (10, 1000)  # the flatness check
BULK1, BULK4, CONN = "bulk 1 stream", "bulk 4 streams", "conn/s"
ANY4 = "kernel relay, listen 0.0.0.0"


# ----------------------------------------------------------------------------- processes


class Daemon:
    """A process we started (in a namespace), its output in a log file; stopped by PID only.

    `ip netns exec` execs the command itself, so the PID is the daemon's own. Has the
    stop()/close() of tests.integration.processes.Proc, so the lab's cleanup can stop it too.
    """

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 20.0) -> int:
        """SIGTERM, wait up to `grace` s (portfwd removes its table and conntrack entries), KILL."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return int(self.popen.returncode)

    def close(self) -> None:
        """Nothing to release: the log file was closed after the fork."""


def wait_until(
    ready: Callable[[], bool], what: str, daemon: Daemon | None = None, timeout: float = 30
) -> None:
    """Poll `ready` (bounded); fail early, with the daemon's last lines, when it exits."""
    deadline = time.monotonic() + timeout
    while not ready():
        if daemon is not None and not daemon.alive():
            raise SystemExit(f"bench: {what}: {daemon.argv[4:6]} exited:\n{daemon.tail()}")
        if time.monotonic() > deadline:
            tail = f":\n{daemon.tail()}" if daemon is not None else ""
            raise SystemExit(f"bench: {what} not ready after {timeout:.0f} s{tail}")
        time.sleep(0.05)


def nft_tables(net: Lab) -> str:
    return net.run(net.gw, "nft", "list", "tables").stdout.decode()


def flush_conntrack(net: Lab) -> None:
    """Empty gw's conntrack table (the lab's gw only): the next path starts from none."""
    net.run(net.gw, "conntrack", "-F", timeout=30)


# ----------------------------------------------------------------------------- measurements


def busy_seconds() -> float:
    """CPU seconds the whole box has been busy (every core; user, system, irq, softirq, steal)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK  # minus idle and iowait


def iperf(net: Lab, host: str, port: int, streams: int, seconds: int) -> tuple[float, float]:
    """(Gbit/s received, box CPU seconds per Gbit); NaNs when iperf3 failed (said on stderr)."""
    before = busy_seconds()
    out = net.run(
        net.wan,
        *("iperf3", "-c", host, "-p", str(port), "-P", str(streams), "-t", str(seconds), "-J"),
        timeout=seconds + 30,
    )
    busy = busy_seconds() - before
    try:
        received = json.loads(out.stdout)["end"]["sum_received"]
    except (ValueError, KeyError):
        print(f"bench: iperf3 to {host}:{port} failed: {out.stdout[-300:]!r}", file=sys.stderr)
        return float("nan"), float("nan")
    gbits = received["bytes"] * 8 / 1e9
    return received["bits_per_second"] / 1e9, busy / gbits if gbits else float("nan")


def wrk(net: Lab, host: str, port: int, seconds: int) -> tuple[float, float]:
    """(HTTP requests/s, one new TCP connection each; box CPU µs per connection)."""
    before = busy_seconds()
    out = net.run(net.wan, *base.wrk_argv(f"http://{host}:{port}/", seconds), timeout=seconds + 30)
    busy = busy_seconds() - before
    rate = base.wrk_rate(out.stdout.decode())
    if rate != rate or not rate:
        print(f"bench: wrk to {host}:{port} failed: {out.stdout[-300:]!r}", file=sys.stderr)
        return float("nan"), float("nan")
    return rate, busy * 1e6 / (rate * seconds)


# ----------------------------------------------------------------------------- the paths


@dataclass
class Route:
    """One way from the wan client to the lan servers: where the client connects, what it
    measures, and what must be loaded in gw while it is measured (enter) and removed after."""

    name: str
    host: str
    http: int
    iperf: int
    measures: tuple[str, ...]
    enter: Callable[[], None] = lambda: None
    leave: Callable[[], None] = lambda: None


def at(host: str, port: int) -> str:
    """`host:port` as a listen value: IPv6 in brackets, `*` as it is."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def kernel_config(tmp: Path, tag: str, rules: int, origin: int, listen: str) -> Path:
    """portfwd with `rules` kernel-relay forwards: rules - 2 others (listen 20000+i -> lan
    30000+i) first, then the measured HTTP and iperf3 forwards, so theirs are the last rules."""
    path = tmp / f"{tag}.toml"
    lines = ["drain_timeout = 1", "[control]", f'socket = "{tmp}/{tag}.sock"']
    forwards = [(at(listen, 20000 + i), f"{LAN_HOST}:{30000 + i}") for i in range(max(rules - 2, 0))]
    forwards += [(at(listen, 8080), f"{LAN_HOST}:{origin}"), (at(listen, IPERF), f"{LAN_HOST}:{IPERF}")]
    for where, connect in forwards:
        lines += ["[[forward]]", f'listen = "{where}"', f'connect = "{connect}"', 'relay = "kernel"']
    path.write_text("\n".join(lines) + "\n")
    return path


def kernel_route(
    net: Lab, tmp: Path, name: str, rules: int, origin: int, measures: tuple[str, ...], listen: str
) -> Route:
    """A portfwd kernel relay started before this path's measurements and stopped after them."""
    tag = "kernel-" + "".join(char if char.isalnum() else "-" for char in name)
    config = kernel_config(tmp, tag, rules, origin, listen)
    running: list[Daemon] = []

    def enter() -> None:
        daemon = Daemon(
            ["ip", "netns", "exec", net.gw, str(PORTFWD), "run", "-q", "-c", str(config)],
            tmp / f"{tag}.log",
        )
        running.append(daemon)
        net.procs.append(daemon)  # type: ignore[arg-type]  (stopped by the lab too if we fail)
        # One nft transaction loads the whole table: once it is listed, every rule is in.
        wait_until(lambda: "table inet portfwd_" in nft_tables(net), f"{name} table", daemon)

    def leave() -> None:
        daemon = running.pop()
        daemon.stop()
        net.procs.remove(daemon)  # type: ignore[arg-type]
        for line in nft_tables(net).splitlines():  # killed before its cleanup: the table is ours
            if line.startswith("table inet portfwd_"):
                net.run(net.gw, "nft", "delete", *line.split()[1:])
        flush_conntrack(net)

    return Route(name, GW_WAN, 8080, IPERF, measures, enter, leave)


def table_route(net: Lab, origin: int, listen: str) -> Route:
    """The kernel relay's table for the same two forwards, loaded with nft (no portfwd process)."""
    table = "kr_table"
    rules = [
        RuleSpec(
            label=f"forward[{index}]",
            name=None,
            listen=parse_listen(at(listen, port)),
            connect=parse_listen(f"{LAN_HOST}:{target}"),
            where=f"forward[{index}]",
        )
        for index, (port, target) in enumerate(((8086, origin), (5286, IPERF)))
    ]
    document = relay.document(relay.plan(rules, table), table)

    def enter() -> None:
        result = net.run(net.gw, "nft", "-f", "-", data=document.encode())
        if result.returncode != 0:
            raise SystemExit(f"bench: nft refused the kernel relay's table: {result.stderr.decode()}")

    def leave() -> None:
        net.run(net.gw, "nft", "delete", "table", "inet", table)
        flush_conntrack(net)

    return Route(
        "kernel relay table, no portfwd process", GW_WAN, 8086, 5286, (BULK1, BULK4, CONN), enter, leave
    )


def hand_route(net: Lab, origin: int) -> Route:
    """The same shape written by hand: a `dnat ip to` rule per port, masquerade of DNATed flows."""
    ruleset = (
        f"table ip {HAND_TABLE} {{\n"
        "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n"
        f"    ip daddr {GW_WAN} tcp dport 9080 dnat ip to {LAN_HOST}:{origin}\n"
        f"    ip daddr {GW_WAN} tcp dport 9201 dnat ip to {LAN_HOST}:{IPERF}\n"
        "  }\n"
        "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;\n"
        '    oifname "gwlan0" ct status dnat masquerade\n'
        "  }\n"
        "}\n"
    )

    def enter() -> None:
        result = net.run(net.gw, "nft", "-f", "-", data=ruleset.encode())
        if result.returncode != 0:
            raise SystemExit(f"bench: nft refused the hand-written table: {result.stderr.decode()}")

    def leave() -> None:
        net.run(net.gw, "nft", "delete", "table", "ip", HAND_TABLE)
        flush_conntrack(net)

    return Route("hand-written nft", GW_WAN, 9080, 9201, (BULK1, BULK4, CONN), enter, leave)


def start_haproxy(net: Lab, tmp: Path, origin: int) -> Route:
    """haproxy at its best for a TCP forward: nbthread = cores, splice-auto, high maxconn, no log."""
    config = tmp / "haproxy.cfg"
    config.write_text(
        f"global\n  maxconn {maxconn()}\n  nbthread {CORES}\n"
        "defaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  timeout client 1h\n"
        "  timeout server 1h\n"
        f"frontend f_http\n  bind {GW_WAN}:8083\n  default_backend b_http\n"
        f"backend b_http\n  server s {LAN_HOST}:{origin}\n"
        f"frontend f_iperf\n  bind {GW_WAN}:5283\n  default_backend b_iperf\n"
        f"backend b_iperf\n  server s {LAN_HOST}:{IPERF}\n"
    )
    daemon = Daemon(["ip", "netns", "exec", net.gw, "haproxy", "-f", str(config), "-db"], tmp / "haproxy.log")
    net.procs.append(daemon)  # type: ignore[arg-type]
    for port in (8083, 5283):
        wait_until(lambda port=port: listening(net, net.gw, port), f"haproxy on {port}", daemon)
    return Route(f"haproxy nbthread={CORES}", GW_WAN, 8083, 5283, (BULK1, BULK4, CONN))


def start_splice(net: Lab, tmp: Path, workers: str, http: int, bulk: int, origin: int) -> Route:
    """portfwd's userspace splice relay, `workers` ("1", "auto") processes, running throughout."""
    config = tmp / f"splice-{workers}.toml"
    value = workers if workers.isdigit() else f'"{workers}"'
    config.write_text(
        f'workers = {value}\ndrain_timeout = 1\n[control]\nsocket = "{tmp}/splice-{workers}.sock"\n'
        f'[[forward]]\nlisten = "{GW_WAN}:{http}"\nconnect = "{LAN_HOST}:{origin}"\nrelay = "splice"\n'
        f'[[forward]]\nlisten = "{GW_WAN}:{bulk}"\nconnect = "{LAN_HOST}:{IPERF}"\nrelay = "splice"\n'
    )
    daemon = Daemon(
        ["ip", "netns", "exec", net.gw, str(PORTFWD), "run", "-q", "-c", str(config)],
        tmp / f"splice-{workers}.log",
    )
    net.procs.append(daemon)  # type: ignore[arg-type]
    for port in (http, bulk):
        wait_until(lambda port=port: listening(net, net.gw, port), f"portfwd splice on {port}", daemon)
    # one stream is one connection, relayed by one process whatever `workers` is
    measures = (BULK4, CONN) if workers == "1" else (BULK1, BULK4, CONN)
    return Route(f"portfwd splice workers={workers}", GW_WAN, http, bulk, measures)


def listening(net: Lab, ns: str, port: int) -> bool:
    return bool(net.run(ns, "ss", "-Htln", f"sport = :{port}").stdout.strip())


def start_origins(net: Lab, tmp: Path) -> None:
    """iperf3 and an HTTP origin (haproxy answering 200 "ok", as bench/gateway.py's) in lan."""
    origin = tmp / "origin.cfg"
    origin.write_text(
        "global\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n"
        "  timeout server 30s\nfrontend origin\n"
        + "".join(f"  bind :{port}\n" for port in ORIGIN_PORTS)
        + '  http-request return status 200 content-type text/plain string "ok"\n'
    )
    for argv, log in (
        (["iperf3", "-s", "-p", str(IPERF)], "iperf3.log"),
        (["haproxy", "-f", str(origin), "-db"], "origin.log"),
    ):
        net.procs.append(Daemon(["ip", "netns", "exec", net.lan, *argv], tmp / log))  # type: ignore[arg-type]
    for port in (IPERF, *ORIGIN_PORTS):
        wait_until(lambda port=port: listening(net, net.lan, port), f"origin on {port}", net.procs[-1])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- driver


def measure(
    net: Lab, route: Route, seconds: int, results: dict[tuple[str, str], list[tuple[float, float]]]
) -> None:
    route.enter()
    try:
        for what in route.measures:
            if what == CONN:
                value = wrk(net, route.host, route.http, seconds)
            else:
                value = iperf(net, route.host, route.iperf, 1 if what == BULK1 else 4, seconds)
            results.setdefault((route.name, what), []).append(value)
    finally:
        route.leave()


def raise_fd_limit(wanted: int = 262144) -> None:
    """Room for haproxy's maxconn: its descriptor limit is inherited from us (raised past the hard
    limit where we may, else to it)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(wanted, hard), max(wanted, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def maxconn() -> int:
    """A high maxconn haproxy can start with under our descriptor limit: it reserves two
    descriptors a connection plus room for pipes (splice) and listeners, about 2.5 in all."""
    return min(100_000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 3)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument(
        "--listen",
        default=GW_WAN,
        help=f"the kernel rules' listen host: {GW_WAN} (default, gw's WAN address: the hand-written"
        " table's match), * (every local address, `fib daddr type local`), 0.0.0.0 (every IPv4 one)"
        ' or :: (every IPv6 one; nothing reaches it here). A "0.0.0.0" row is measured whatever it is',
    )
    parser.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md")
    args = parser.parse_args()
    missing = [
        tool for tool in ("iperf3", "wrk", "haproxy", "nft", "conntrack", "ss") if not shutil.which(tool)
    ]
    if missing:
        print(f"bench: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    raise_fd_limit()
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    began = time.monotonic()
    with lab() as net, tempfile.TemporaryDirectory(prefix="pf-bench-kr-") as tmp_text:
        tmp = Path(tmp_text)
        if "table" in nft_tables(net):
            raise SystemExit("bench: gw already has nft tables")
        start_origins(net, tmp)
        # direct routing: wan gets a route to the LAN through gw (lan's default route is gw)
        net.run(net.wan, "ip", "route", "add", LAN_NET, "via", GW_WAN)
        origins = iter(ORIGIN_PORTS)
        every = (BULK1, BULK4, CONN)
        routes = [
            Route("direct routing", LAN_HOST, next(origins), IPERF, every),
            kernel_route(net, tmp, "kernel relay", 2, next(origins), every, args.listen),
            table_route(net, next(origins), args.listen),
            hand_route(net, next(origins)),
            start_haproxy(net, tmp, next(origins)),
            start_splice(net, tmp, "1", 8084, 5284, next(origins)),
            start_splice(net, tmp, "auto", 8085, 5285, next(origins)),
        ]
        routes += [
            kernel_route(
                net, tmp, f"kernel relay, {rules:,} rules", rules, next(origins), (BULK1, CONN), args.listen
            )
            for rules in KERNEL_RULES
        ]
        routes.append(kernel_route(net, tmp, ANY4, 2, next(origins), (BULK1, CONN), "0.0.0.0"))
        for number in range(args.rounds):
            print(f"bench: round {number + 1} of {args.rounds}", file=sys.stderr, flush=True)
            order = routes[:]
            random.shuffle(order)
            for route in order:
                measure(net, route, args.seconds, results)
        names = [route.name for route in routes]
    took = time.monotonic() - began
    report = render(names, results, args, took)
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


def render(
    names: list[str],
    results: dict[tuple[str, str], list[tuple[float, float]]],
    args: argparse.Namespace,
    took: float,
) -> str:
    def value(name: str, what: str, index: int = 0) -> float:
        return base.median([sample[index] for sample in results.get((name, what), [])])

    def fmt(number: float, digits: int) -> str:
        return "n/a" if number != number else f"{number:,.{digits}f}"

    def ratio(top: float, bottom: float) -> float:
        return top / bottom if bottom and bottom == bottom and top == top else float("nan")

    versions = {
        "kernel": platform.release(),
        "nft": first_line(["nft", "--version"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "iperf3": first_line(["iperf3", "--version"]),
        "cpus": str(CORES),
    }
    lines = [
        MARKER.strip(),
        "",
        f"Measured {datetime.date.today().isoformat()} by `bench/kernelrelay.py --rounds {args.rounds}"
        f" --seconds {args.seconds} --listen {args.listen}` ({took:.0f} s) in the lan / gw / wan veth lab (client in wan, servers"
        " in lan, forwarders in gw), interleaved rounds, medians. "
        + ", ".join(f"{k}: {v}" for k, v in versions.items())
        + ". Box CPU is every process and softirq on the machine (client and servers included).",
        "",
        "| path | bulk 1 stream Gbit/s | bulk 4 streams Gbit/s | conn/s (HTTP, close) "
        "| box CPU s per Gbit (1 stream) | box CPU µs per conn |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        lines.append(
            f"| {name} | {fmt(value(name, BULK1), 2)} | {fmt(value(name, BULK4), 2)} | {fmt(value(name, CONN), 0)} "
            f"| {fmt(value(name, BULK1, 1), 3)} | {fmt(value(name, CONN, 1), 1)} |"
        )
    kernel, direct, hand = "kernel relay", "direct routing", "hand-written nft"
    table = "kernel relay table, no portfwd process"
    haproxy = f"haproxy nbthread={CORES}"
    few, many = (f"kernel relay, {rules:,} rules" for rules in KERNEL_RULES)
    checks = [
        ("kernel / direct, bulk 1 stream", ratio(value(kernel, BULK1), value(direct, BULK1)), "≥ 0.95"),
        ("kernel / direct, bulk 4 streams", ratio(value(kernel, BULK4), value(direct, BULK4)), "≥ 0.95"),
        ("kernel / direct, conn/s", ratio(value(kernel, CONN), value(direct, CONN)), "(context)"),
        ("kernel / hand-written nft, conn/s", ratio(value(kernel, CONN), value(hand, CONN)), "≥ 0.95"),
        (
            "kernel table alone (no portfwd process) / hand-written nft, conn/s",
            ratio(value(table, CONN), value(hand, CONN)),
            "(context)",
        ),
        (
            "kernel, listen 0.0.0.0 / listen " + args.listen + ", conn/s",
            ratio(value(ANY4, CONN), value(kernel, CONN)),
            "(context)",
        ),
        (
            "kernel / hand-written nft, bulk 1 stream",
            ratio(value(kernel, BULK1), value(hand, BULK1)),
            "(context)",
        ),
        (
            "kernel / hand-written nft, bulk 4 streams",
            ratio(value(kernel, BULK4), value(hand, BULK4)),
            "(context)",
        ),
        ("kernel / haproxy, conn/s", ratio(value(kernel, CONN), value(haproxy, CONN)), "≥ 1.1"),
        ("kernel / haproxy, bulk 1 stream", ratio(value(kernel, BULK1), value(haproxy, BULK1)), "(context)"),
        ("kernel / haproxy, bulk 4 streams", ratio(value(kernel, BULK4), value(haproxy, BULK4)), "(context)"),
        (
            f"kernel, {KERNEL_RULES[1]:,} rules / {KERNEL_RULES[0]} rules, conn/s",
            ratio(value(many, CONN), value(few, CONN)),
            "≥ 0.95 (flat)",
        ),
        (
            f"kernel, {KERNEL_RULES[1]:,} rules / {KERNEL_RULES[0]} rules, bulk 1 stream",
            ratio(value(many, BULK1), value(few, BULK1)),
            "(context)",
        ),
    ]
    lines += ["", "| ratio | value | goal | |", "|---|---|---|---|"]
    for label, number, goal in checks:
        if goal.startswith("≥"):
            verdict = "met" if number == number and number >= float(goal.split()[1]) else "NOT met"
        else:
            verdict = ""
        lines.append(f"| {label} | {fmt(number, 2)} | {goal} | {verdict} |")
    return "\n".join(lines) + "\n"


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
