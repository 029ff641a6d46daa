"""Benchmarks: portfwd (splice and protocol paths) beside direct, haproxy, socat and rinetd.

Every measurement is taken for every forwarder in the same run, in interleaved rounds (the
order shuffled per round), and reported as medians and as ratios to the baselines, so that the
machine's speed cancels out. All traffic is on 127.0.0.1; every process is ours and is stopped
by PID.

Usage: .venv/bin/python bench/run.py [--rounds N] [--seconds S] [--conns N] [--write] [--before REPO]

--before REPO adds REPO's portfwd (another checkout with its own .venv, e.g. `git worktree add
/tmp/before <commit>`) as `before-splice` and `before-protocol`, measured in the same interleaved
rounds, and prints each build's ratios to the baselines side by side (a refactor's A/B).
Needs: iperf3, haproxy, socat, rinetd, wrk (apt-get install iperf3 haproxy socat rinetd wrk).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TICK = os.sysconf("SC_CLK_TCK")
LOCAL = "127.0.0.1"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free for TCP and UDP, never one this run handed out before (the kernel may give
    the same free port to two binds in a row)."""
    for _ in range(100):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind((LOCAL, 0))
            port = int(tcp.getsockname()[1])
            if port in _HANDED_OUT:
                continue
            udp.bind((LOCAL, port))  # free for both, since iperf3 -u needs TCP and UDP on one port
            _HANDED_OUT.add(port)
            return port
    raise SystemExit("bench: no free port after 100 tries")


def wait_tcp(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((LOCAL, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Wait for a TCP listener on `port` without connecting to it (`ss -l`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
        if out.strip():
            return
        time.sleep(0.02)
    raise TimeoutError(f"no TCP listener on {port}")


def wait_udp(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["ss", "-Hlun", f"sport = :{port}"], capture_output=True, text=True).stdout
        if out.strip():
            return
        time.sleep(0.02)
    raise TimeoutError(f"no UDP listener on {port}")


class Proc:
    """A process we started; stopped by PID only."""

    def __init__(self, argv: list[str], **kwargs: object) -> None:
        # A session of its own, so stop() reaches the children it forks (socat's fork mode).
        self.popen = subprocess.Popen(  # type: ignore[call-overload]
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **kwargs
        )

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        # Children it forked and left behind (socat's per-peer UDP processes) are in its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of these processes and all their descendants (socat forks one per client).

    Live children are read directly; reaped ones are in their parent's cutime/cstime.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total = 0.0
    todo = list(pids)
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        fields = _stat(pid)
        if fields is not None:
            total += sum(int(value) for value in fields[11:15]) / TICK  # utime stime cutime cstime
        todo.extend(children.get(pid, []))
    return total


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class Targets:
    """The servers every path reaches: iperf3, an HTTP origin (haproxy), and an echo server."""

    iperf: int
    http: int
    echo: int
    procs: list[Proc] = field(default_factory=list)


@dataclass
class Forwarder:
    """One way of reaching the targets; ports maps target name -> port a client uses."""

    name: str
    ports: dict[str, int]
    procs: list[Proc] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def start_targets(tmp: Path) -> Targets:
    targets = Targets(free_port(), free_port(), free_port())
    targets.procs.append(Proc(["iperf3", "-s", "-B", LOCAL, "-p", str(targets.iperf)]))
    origin = tmp / "origin.cfg"
    origin.write_text(
        "global\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n"
        f"  timeout server 30s\nfrontend origin\n  bind {LOCAL}:{targets.http}\n"
        '  http-request return status 200 content-type text/plain string "ok"\n'
    )
    targets.procs.append(Proc(["haproxy", "-f", str(origin), "-db"]))
    targets.procs.append(Proc([sys.executable, str(HERE / "echo_server.py"), str(targets.echo)]))
    try:
        for port in (targets.iperf, targets.http, targets.echo):
            wait_tcp(port)
    except OSError:
        for proc in targets.procs:
            proc.stop()
        raise
    return targets


def start_forwarders(
    targets: Targets, tmp: Path, forwarders: list[Forwarder], before: Path | None = None
) -> list[Forwarder]:
    """Start every forwarder, appending to `forwarders` as it goes so the caller can stop them."""
    names = ("iperf", "http", "echo")
    upstream = {"iperf": targets.iperf, "http": targets.http, "echo": targets.echo}
    forwarders.append(Forwarder("direct", {**upstream, "udp": targets.iperf}))

    builds = [("portfwd", REPO)] + ([("before", before)] if before is not None else [])
    for (build, repo), relay in [(item, relay) for item in builds for relay in ("splice", "protocol")]:
        ports = {name: free_port() for name in (*names, "udp")}
        config = tmp / f"{build}-{relay}.toml"
        rules = [
            f'[[forward]]\nlisten = "{LOCAL}:{ports[name]}"\nconnect = "{LOCAL}:{upstream[name]}"\nrelay = "{relay}"\n'
            for name in names
        ]
        rules.append(
            f'[[forward]]\nlisten = "{LOCAL}:{ports["udp"]}"\nconnect = "{LOCAL}:{targets.iperf}"\n'
            f'protocol = "tcp+udp"\nrelay = "{relay}"\nudp_max_flows = 64\n'
        )
        rules.append("[control]\nenabled = false\n")
        config.write_text("\n".join(rules))
        portfwd = Proc([str(repo / ".venv/bin/portfwd"), "run", "-q", "-c", str(config)])
        forwarders.append(Forwarder(f"{build}-{relay}", ports, [portfwd]))

    ports = {name: free_port() for name in names}
    haproxy_cfg = tmp / "haproxy.cfg"
    lines = [
        "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
    ]
    for name in names:
        lines.append(
            f"frontend f_{name}\n  bind {LOCAL}:{ports[name]}\n  default_backend b_{name}\n"
            f"backend b_{name}\n  server s {LOCAL}:{upstream[name]}\n"
        )
    haproxy_cfg.write_text("".join(lines))
    forwarders.append(Forwarder("haproxy", ports, [Proc(["haproxy", "-f", str(haproxy_cfg), "-db"])]))

    ports = {name: free_port() for name in (*names, "udp")}
    socat = [
        Proc(
            [
                "socat",
                f"TCP-LISTEN:{ports[name]},bind={LOCAL},reuseaddr,fork,backlog=4096",
                f"TCP:{LOCAL}:{upstream[name]}",
            ]
        )
        for name in names
    ]
    socat.append(
        Proc(
            [
                "socat",
                f"TCP-LISTEN:{ports['udp']},bind={LOCAL},reuseaddr,fork",
                f"TCP:{LOCAL}:{targets.iperf}",
            ]
        )
    )
    socat.append(
        Proc(
            [
                "socat",
                f"UDP-LISTEN:{ports['udp']},bind={LOCAL},reuseaddr,fork",
                f"UDP:{LOCAL}:{targets.iperf}",
            ]
        )
    )
    forwarders.append(Forwarder("socat", ports, socat))

    ports = {name: free_port() for name in (*names, "udp")}
    rinetd_cfg = tmp / "rinetd.conf"
    rinetd_cfg.write_text(
        "".join(f"{LOCAL} {ports[name]} {LOCAL} {upstream[name]}\n" for name in names)
        + f"{LOCAL} {ports['udp']}/tcp {LOCAL} {targets.iperf}/tcp\n"
        + f"{LOCAL} {ports['udp']}/udp {LOCAL} {targets.iperf}/udp\n"
    )
    forwarders.append(Forwarder("rinetd", ports, [Proc(["rinetd", "-f", "-c", str(rinetd_cfg)])]))

    for forwarder in forwarders:
        for name in names:
            if name == "iperf":  # iperf3 serves one client at a time and would take a probe for one
                wait_listening(forwarder.ports[name])
            else:
                wait_tcp(forwarder.ports[name])
        if "udp" in forwarder.ports and forwarder.name != "direct":
            wait_udp(forwarder.ports["udp"])
    return forwarders


# ----------------------------------------------------------------------------- measurements


def iperf_tcp(forwarder: Forwarder, streams: int, seconds: float) -> tuple[float, float]:
    """(Gbit/s received, forwarder CPU seconds per Gbit transferred)."""
    before = cpu_seconds(forwarder.pids)
    out = subprocess.run(
        [
            "iperf3",
            "-c",
            LOCAL,
            "-p",
            str(forwarder.ports["iperf"]),
            "-t",
            str(seconds),
            "-P",
            str(streams),
            "-J",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    cpu = cpu_seconds(forwarder.pids) - before
    result = json.loads(out.stdout)
    if "sum_received" not in result.get("end", {}):
        raise SystemExit(
            f"bench: iperf3 through {forwarder.name} failed: {result.get('error', out.stderr.strip())}"
        )
    received = result["end"]["sum_received"]
    gbits = received["bytes"] * 8 / 1e9
    return received["bits_per_second"] / 1e9, (cpu / gbits if gbits else float("nan"))


def wrk_argv(url: str, seconds: float) -> list[str]:
    """wrk with one new TCP connection per request (HTTP close): what conn/s means here."""
    return ["wrk", "-t1", "-c32", f"-d{seconds}s", "-H", "Connection: close", url]


def wrk_rate(out: str) -> float:
    """Requests/s from wrk's report (NaN when it printed none)."""
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    return float("nan")


def wrk_conn_rate(forwarder: Forwarder, seconds: float) -> tuple[float, float]:
    """(HTTP requests/s with one new TCP connection each, forwarder CPU µs per connection)."""
    before = cpu_seconds(forwarder.pids)
    out = subprocess.run(
        wrk_argv(f"http://{LOCAL}:{forwarder.ports['http']}/", seconds),
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    cpu = cpu_seconds(forwarder.pids) - before
    rate = wrk_rate(out)
    return rate, (cpu * 1e6 / (rate * seconds) if rate else float("nan"))  # NaN stays NaN


#: Latency rounds per round of the other measures. A round's p50 is bimodal on this machine
#: (~20 µs or ~80 µs through any forwarder, by where the scheduler puts the three processes for
#: that connection), so many short rounds give a steadier median than a few long ones.
LATENCY_ROUNDS = 5


def ping_pong(forwarder: Forwarder, count: int = 3000) -> tuple[float, float]:
    """p50 and p99 round trip (microseconds) of 1-byte ping-pong over one connection."""
    with socket.create_connection((LOCAL, forwarder.ports["echo"]), timeout=5) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(200):  # warm up
            client.sendall(b"x")
            client.recv(1)
        samples = []
        for _ in range(count):
            start = time.perf_counter_ns()
            client.sendall(b"x")
            client.recv(1)
            samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


def idle_memory(forwarder: Forwarder, conns: int, rss: Callable[[int], int] = rss_kib) -> float:
    """Forwarder RSS growth per relayed idle connection (bytes), after one echo on each.

    `rss` reads a pid's resident KiB; bench/tunnel.py passes one that adds sshd's children.
    """
    pid = forwarder.pids[0]
    before = rss(pid)
    clients = []
    try:
        for _ in range(conns):
            client = socket.create_connection((LOCAL, forwarder.ports["echo"]), timeout=10)
            clients.append(client)
        for client in clients:
            client.sendall(b"x")
        for client in clients:
            if client.recv(1) != b"x":
                return float("nan")
        after = rss(pid)
    except OSError:
        return float("nan")
    finally:
        for client in clients:
            client.close()
    return (after - before) * 1024 / conns


def udp_kpps(forwarder: Forwarder, seconds: float) -> tuple[float, float]:
    """(Delivered thousands of 64-byte datagrams/s with iperf3 -u -b 0, forwarder CPU µs each)."""
    before = cpu_seconds(forwarder.pids)
    out = subprocess.run(
        [
            "iperf3",
            "-c",
            LOCAL,
            "-p",
            str(forwarder.ports["udp"]),
            "-u",
            "-l",
            "64",
            "-b",
            "0",
            "-t",
            str(seconds),
            "-J",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    cpu = cpu_seconds(forwarder.pids) - before
    try:
        result = json.loads(out.stdout)
        total = result["end"]["sum"]
        delivered = total["packets"] - total["lost_packets"]
    except (ValueError, KeyError):
        return float("nan"), float("nan")
    if delivered <= 0 or delivered > total["packets"]:
        return float("nan"), float("nan")  # rinetd's UDP run reports nonsense counts
    return delivered / total["seconds"] / 1000, cpu * 1e6 / delivered


# ----------------------------------------------------------------------------- driver


def rounds(
    forwarders: list[Forwarder], count: int, measure: Callable[[Forwarder], object]
) -> dict[str, list[object]]:
    results: dict[str, list[object]] = {f.name: [] for f in forwarders}
    for _ in range(count):
        order = forwarders[:]
        random.shuffle(order)
        for forwarder in order:
            results[forwarder.name].append(measure(forwarder))
    return results


def median(values: list[float]) -> float:
    good = [v for v in values if v == v]
    return statistics.median(good) if good else float("nan")


def by_round(results: dict[str, list[Any]], name: str, base_name: str) -> float:
    """The median of each round's own ratio of `name`'s conn/s to `base_name`'s. Every round
    measures each forwarder back to back, and this machine's speed drifts by 20 % over minutes:
    a ratio taken within a round leaves the drift out, a ratio of two medians does not."""
    return median([a[0] / b[0] for a, b in zip(results[name], results[base_name], strict=True)])


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    return {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "portfwd": first_line([str(REPO / ".venv/bin/portfwd"), "--version"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "socat": first_line(["socat", "-V"]).strip()
        if False
        else first_line(["dpkg-query", "-W", "-f=socat ${Version}", "socat"]),
        "rinetd": first_line(["dpkg-query", "-W", "-f=rinetd ${Version}", "rinetd"]),
        "iperf3": first_line(["iperf3", "--version"]),
        "wrk": first_line(["dpkg-query", "-W", "-f=wrk ${Version}", "wrk"]),
        "cpus": str(os.cpu_count()),
    }


@contextlib.contextmanager
def lab(before: Path | None = None) -> Iterator[tuple[Targets, list[Forwarder]]]:
    with tempfile.TemporaryDirectory(prefix="pf-bench-") as tmp_text:
        tmp = Path(tmp_text)
        targets = start_targets(tmp)
        forwarders: list[Forwarder] = []
        try:
            forwarders = start_forwarders(targets, tmp, forwarders, before)
            yield targets, forwarders
        finally:
            for forwarder in forwarders:
                forwarder.stop()
            for proc in targets.procs:
                proc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--conns", type=int, default=5000)
    parser.add_argument("--write", action="store_true", help="write bench/RESULTS.md")
    parser.add_argument("--before", type=Path, help="another checkout's portfwd, measured beside this one")
    args = parser.parse_args()
    if args.before is not None and not (args.before / ".venv/bin/portfwd").exists():
        print(
            f"bench: {args.before}/.venv/bin/portfwd is missing; run its ./test once to build it",
            file=sys.stderr,
        )
        return 2
    missing = [
        tool for tool in ("iperf3", "haproxy", "socat", "rinetd", "wrk", "ss") if shutil.which(tool) is None
    ]
    if missing:
        print(
            f"bench: missing {', '.join(missing)}; apt-get install iperf3 haproxy socat rinetd wrk",
            file=sys.stderr,
        )
        return 2
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    seconds = int(args.seconds)
    table: dict[str, dict[str, float]] = {}
    with lab(args.before) as (_, forwarders):
        tcp1 = rounds(forwarders, args.rounds, lambda f: iperf_tcp(f, 1, seconds))
        tcp4 = rounds(forwarders, args.rounds, lambda f: iperf_tcp(f, 4, seconds))
        conn = rounds(forwarders, args.rounds, lambda f: wrk_conn_rate(f, seconds))
        lat = rounds(forwarders, args.rounds * LATENCY_ROUNDS, lambda f: ping_pong(f, 1000))
        udp_forwarders = [f for f in forwarders if "udp" in f.ports]
        udp = rounds(udp_forwarders, args.rounds, lambda f: udp_kpps(f, seconds))
        memory = {
            f.name: idle_memory(f, args.conns)
            for f in forwarders
            if f.name not in ("direct", "socat")  # socat forks a process per connection
        }
    for forwarder in forwarders:
        name = forwarder.name
        table[name] = {
            "tcp1_gbps": median([v[0] for v in tcp1[name]]),  # type: ignore[index]
            "tcp4_gbps": median([v[0] for v in tcp4[name]]),  # type: ignore[index]
            "cpu_s_per_gbit": median([v[1] for v in tcp1[name]]),  # type: ignore[index]
            "conn_per_s": median([v[0] for v in conn[name]]),  # type: ignore[index]
            "cpu_us_per_conn": median([v[1] for v in conn[name]]),  # type: ignore[index]
            "p50_us": median([v[0] for v in lat[name]]),  # type: ignore[index]
            "p99_us": median([v[1] for v in lat[name]]),  # type: ignore[index]
            "udp_kpps": median([v[0] for v in udp[name]]) if name in udp else float("nan"),  # type: ignore[index]
            "cpu_us_per_datagram": median([v[1] for v in udp[name]]) if name in udp else float("nan"),  # type: ignore[index]
            "idle_bytes_per_conn": memory.get(name, float("nan")),
        }
    report = render(table, versions(), args)
    print(report)
    if args.before is not None:
        print(render_before(table))
    if args.write and args.before is None:
        # Keep what follows our table: the hand-written notes on reading it, then the sections
        # bench/accounting.py and bench/tunnel.py wrote.
        results = HERE / "RESULTS.md"
        old = results.read_text() if results.exists() else ""
        kept = ""
        for marker in ("\n## Reading these numbers", "\n## Cost of accounting (issue #4)"):
            if marker in old:
                kept = old[old.index(marker) :]
                break
        results.write_text(report + kept)
    return 0


#: (label, metric, baseline path, whether higher is better) for the before/after table.
BEFORE_AFTER = (
    ("bulk 1 stream vs direct", "tcp1_gbps", "direct", True),
    ("bulk 4 streams vs direct", "tcp4_gbps", "direct", True),
    ("CPU per Gbit vs haproxy", "cpu_s_per_gbit", "haproxy", False),
    ("conn/s vs haproxy", "conn_per_s", "haproxy", True),
    ("CPU per conn vs haproxy", "cpu_us_per_conn", "haproxy", False),
    ("UDP kpps vs socat", "udp_kpps", "socat", True),
    ("CPU per datagram vs socat", "cpu_us_per_datagram", "socat", False),
    ("RSS per idle conn vs haproxy", "idle_bytes_per_conn", "haproxy", False),
)


def render_before(table: dict[str, dict[str, float]]) -> str:
    """Each build's ratio to the same baseline, and after / before (1.00 = no change)."""
    lines = [
        "| path | ratio | before | after | after / before |",
        "|---|---|---|---|---|",
    ]
    for relay in ("splice", "protocol"):
        after, before = table[f"portfwd-{relay}"], table[f"before-{relay}"]
        for label, key, baseline, _ in BEFORE_AFTER:
            base = table[baseline][key]
            old, new = before[key] / base, after[key] / base
            lines.append(f"| {relay} | {label} | {old:.3f} | {new:.3f} | {new / old:.3f} |")
    return "\n".join(lines) + "\n"


def render(table: dict[str, dict[str, float]], info: dict[str, str], args: argparse.Namespace) -> str:
    def fmt(value: float, digits: int = 2) -> str:
        return "n/a" if value != value else f"{value:,.{digits}f}"

    def ratio(top: float, bottom: float) -> float:
        return top / bottom if bottom and bottom == bottom and top == top else float("nan")

    direct, haproxy, socat = table["direct"], table["haproxy"], table["socat"]
    lines = [
        "# portfwd benchmark results",
        "",
        f"Measured {datetime.date.today().isoformat()} by `bench/run.py --rounds {args.rounds} --seconds {args.seconds:g}"
        f" --conns {args.conns}` on one machine, every forwarder in the same run, interleaved rounds, medians.",
        "All traffic on 127.0.0.1. " + ", ".join(f"{k}: {v}" for k, v in info.items()) + ".",
        f"Round-trip times: {args.rounds * LATENCY_ROUNDS} interleaved rounds of 1,000 one-byte pings on one"
        " connection each; the columns are the medians of the rounds' p50 and p99.",
        "",
        "| path | TCP 1 stream Gbit/s | TCP 4 streams Gbit/s | CPU s per Gbit (1 stream) | conn/s (HTTP, close) "
        "| CPU µs per conn | p50 RTT µs | p99 RTT µs | UDP 64 B kpps delivered | CPU µs per datagram "
        "| RSS per idle conn (bytes) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {fmt(row['tcp1_gbps'])} | {fmt(row['tcp4_gbps'])} | {fmt(row['cpu_s_per_gbit'], 3)} | "
            f"{fmt(row['conn_per_s'], 0)} | {fmt(row['cpu_us_per_conn'], 1)} | {fmt(row['p50_us'], 1)} | "
            f"{fmt(row['p99_us'], 1)} | {fmt(row['udp_kpps'], 1)} | {fmt(row['cpu_us_per_datagram'], 2)} | "
            f"{fmt(row['idle_bytes_per_conn'], 0)} |"
        )
    lines += ["", "## Ratios against the targets (issue #3)", ""]
    for name in ("portfwd-splice", "portfwd-protocol"):
        row = table[name]
        checks = [
            (
                "TCP bulk 1 stream vs direct (goal ≥ 0.80)",
                ratio(row["tcp1_gbps"], direct["tcp1_gbps"]),
                0.80,
                True,
            ),
            (
                "TCP bulk 1 stream vs haproxy (goal ≥ 1.6)",
                ratio(row["tcp1_gbps"], haproxy["tcp1_gbps"]),
                1.6,
                True,
            ),
            (
                "CPU per Gbit vs haproxy (goal ≤ 0.33)",
                ratio(row["cpu_s_per_gbit"], haproxy["cpu_s_per_gbit"]),
                0.33,
                False,
            ),
            ("conn/s vs haproxy (goal ≥ 0.9)", ratio(row["conn_per_s"], haproxy["conn_per_s"]), 0.9, True),
            (
                "added p50 latency vs haproxy's (goal ≤ 1.0)",
                ratio(row["p50_us"] - direct["p50_us"], haproxy["p50_us"] - direct["p50_us"]),
                1.0,
                False,
            ),
            ("RSS per idle connection, bytes (goal ≤ 2048)", row["idle_bytes_per_conn"], 2048, False),
            ("UDP kpps vs socat (goal ≥ 1.2)", ratio(row["udp_kpps"], socat["udp_kpps"]), 1.2, True),
            (
                "(context) CPU per connection vs haproxy",
                ratio(row["cpu_us_per_conn"], haproxy["cpu_us_per_conn"]),
                1e9,
                False,
            ),
            (
                "(context) CPU per datagram vs socat",
                ratio(row["cpu_us_per_datagram"], socat["cpu_us_per_datagram"]),
                1e9,
                False,
            ),
        ]
        lines.append(f"**{name}**")
        lines.append("")
        for label, value, goal, higher in checks:
            met = value == value and (value >= goal if higher else value <= goal)
            verdict = "" if label.startswith("(context)") else f" — {'met' if met else 'NOT met'}"
            lines.append(f"- {label}: {fmt(value)}{verdict}")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
