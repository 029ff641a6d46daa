"""SSH tunnel benchmark: `portfwd ssh -L` beside OpenSSH's `ssh -L`, to the same sshd, same cipher.

With --server: the stock `ssh -L` through `portfwd server` beside the same client through
OpenSSH's sshd (CPU and memory are then the server's, its session processes included).

For each cipher (aes128-gcm, chacha20-poly1305), in interleaved rounds of one run: iperf3 bulk
Gbit/s (1 stream) and client CPU per Gbit, conn/s of small HTTP requests (wrk, one connection
each), p50 round trip of 1-byte ping-pong, and client memory per idle tunnelled connection.
Reported as ratios portfwd / OpenSSH. All traffic is on 127.0.0.1; needs root (sshd privsep).

Usage: .venv/bin/python bench/tunnel.py [--server] [--rounds N] [--seconds S] [--conns N] [--write]
                                       [--before REPO]

--before REPO adds REPO's portfwd (another checkout with its own .venv) beside this one, in the
same interleaved rounds, and prints both builds' ratios to OpenSSH side by side.
"""

from __future__ import annotations

import argparse
import datetime
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import run as base  # bench/run.py: targets, measurements, rounds, medians

sys.path.insert(0, str(base.REPO))
from tests.integration.sshd import Sshd

CIPHERS = {"aes128-gcm": "aes128-gcm@openssh.com", "chacha20": "chacha20-poly1305@openssh.com"}
MARKERS = {False: "\n## SSH tunnels (issue #5)", True: "\n## SSH tunnel server (issue #6)"}
NOTES = "### What holds the tunnel back"
NAMES = ("iperf", "http", "echo")


def upstream_of(targets: base.Targets, forwarders: list[base.Forwarder]) -> dict[str, int]:
    """The target ports by name; the `direct` path (no tunnel) goes first among the forwarders."""
    upstream = {"iperf": targets.iperf, "http": targets.http, "echo": targets.echo}
    forwarders.append(base.Forwarder("direct", dict(upstream)))
    return upstream


def ssh_options(
    upstream: dict[str, int], key: Path, known_hosts: Path, cipher: str, port: int
) -> tuple[dict[str, int], list[str]]:
    """Fresh local ports for the targets, and the OpenSSH options (`ssh` and `portfwd ssh` alike)
    that forward them through the server at `port` with `cipher`."""
    ports = {name: base.free_port() for name in NAMES}
    specs = [arg for name in NAMES for arg in ("-L", f"127.0.0.1:{ports[name]}:127.0.0.1:{upstream[name]}")]
    options = [
        "-F",
        "/dev/null",
        "-i",
        str(key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        f"Ciphers={cipher}",
        "-o",
        "Compression=no",
        "-p",
        str(port),
        "-N",
        *specs,
        "root@127.0.0.1",
    ]
    return ports, options


#: Stock ssh in front of the shared options: never prompt, never accept an unknown host key.
OPENSSH = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]


def start_tunnels(
    sshd: Sshd, targets: base.Targets, forwarders: list[base.Forwarder], before: Path | None = None
) -> None:
    upstream = upstream_of(targets, forwarders)
    builds = {"portfwd": base.REPO, **({"before": before} if before is not None else {})}
    for short, cipher in CIPHERS.items():
        for client in ("openssh", *builds):
            ports, options = ssh_options(upstream, sshd.user_key, sshd.known_hosts, cipher, sshd.port)
            if client == "openssh":
                argv = [*OPENSSH, *options]
            else:
                argv = [str(builds[client] / ".venv/bin/portfwd"), "ssh", "-q", *options]
            forwarders.append(base.Forwarder(f"{client}-{short}", ports, [base.Proc(argv)]))
    for forwarder in forwarders:
        # Not the iperf port: iperf3 serves one client at a time and would take a probe for one.
        base.wait_tcp(forwarder.ports["http"])


class _Server:
    """A server process shared by several forwarders: measured through them, stopped once."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def stop(self) -> None:
        """Stopped by its owner, not per forwarder."""


def tree_rss_kib(pid: int) -> int:
    """RSS of a process and every descendant (sshd forks one or two per connection)."""
    from tests.integration.sshd import descendants

    return sum(base.rss_kib(item) for item in [pid, *descendants(pid)] if Path(f"/proc/{item}").exists())


def start_servers(
    sshd: Sshd,
    tmp: Path,
    targets: base.Targets,
    forwarders: list[base.Forwarder],
    clients: list[base.Proc],
    before: Path | None = None,
) -> None:
    """ssh -L through sshd and through portfwd server, per cipher (every process goes in `clients`)."""
    upstream = upstream_of(targets, forwarders)
    (tmp / "server.keys").write_text((tmp / "id_ed25519.pub").read_text())
    assert sshd.proc is not None
    servers = [("sshd", sshd.port, sshd.proc.pid)]
    known_lines = sshd.known_hosts.read_text()
    builds = {"portfwd-server": base.REPO, **({"before-server": before} if before is not None else {})}
    for name, repo in builds.items():
        port = base.free_port()
        config = tmp / f"{name}.toml"
        config.write_text(
            f'[control]\nenabled = false\n[server]\nlisten = "127.0.0.1:{port}"\nhost_key = "{tmp / "pf_host"}"\n'
            # One ssh -L carries --conns idle connections (sshd: MaxSessions 10000 above).
            "max_channels = 100000\nmax_channels_per_user = 1000000\n"
            f'[[server.user]]\nname = "root"\nauthorized_keys = "{tmp / "server.keys"}"\npermit_open = ["any"]\n'
        )
        server = base.Proc([str(repo / ".venv/bin/portfwd"), "server", "-q", "-c", str(config)])
        clients.append(server)  # stopped by the caller, even if what follows fails
        base.wait_tcp(port)
        public = subprocess.run(
            ["ssh-keygen", "-y", "-f", str(tmp / "pf_host")], capture_output=True, text=True, check=True
        ).stdout.strip()
        known_lines += f"[127.0.0.1]:{port} {public}\n"
        servers.append((name, port, server.pid))
    known = tmp / "known_hosts_all"
    known.write_text(known_lines)
    for short, cipher in CIPHERS.items():
        for name, server_port, pid in servers:
            ports, options = ssh_options(upstream, sshd.user_key, known, cipher, server_port)
            argv = [*OPENSSH, *options]
            clients.append(base.Proc(argv))
            forwarders.append(base.Forwarder(f"{name}-{short}", ports, [_Server(pid)]))  # type: ignore[list-item]
    for forwarder in forwarders:
        base.wait_tcp(forwarder.ports["http"])


def server_idle_memory(forwarder: base.Forwarder, conns: int) -> float:
    """Server RSS growth (process tree) per idle forwarded connection, in bytes."""
    return base.idle_memory(forwarder, conns, tree_rss_kib)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md")
    parser.add_argument("--server", action="store_true", help="portfwd server beside sshd (issue #6)")
    parser.add_argument("--before", type=Path, help="another checkout's portfwd, measured beside this one")
    args = parser.parse_args()
    if args.before is not None and not (args.before / ".venv/bin/portfwd").exists():
        print(
            f"bench: {args.before}/.venv/bin/portfwd is missing; run its ./test once to build it",
            file=sys.stderr,
        )
        return 2
    missing = [tool for tool in ("iperf3", "haproxy", "wrk", "ssh") if shutil.which(tool) is None]
    if missing:
        print(
            f"bench: missing {', '.join(missing)}; apt-get install iperf3 haproxy wrk openssh-client",
            file=sys.stderr,
        )
        return 2
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    seconds = int(args.seconds)
    with tempfile.TemporaryDirectory(prefix="pf-bench-ssh-") as tmp_text:
        tmp = Path(tmp_text)
        sshd = Sshd(tmp, ("MaxSessions 10000", "MaxStartups 1000")).start()
        targets = base.start_targets(tmp)
        forwarders: list[base.Forwarder] = []
        clients: list[base.Proc] = []
        try:
            if args.server:
                start_servers(sshd, tmp, targets, forwarders, clients, args.before)
            else:
                start_tunnels(sshd, targets, forwarders, args.before)
            bulk = base.rounds(forwarders, args.rounds, lambda f: base.iperf_tcp(f, 1, seconds))
            conn = base.rounds(forwarders, args.rounds, lambda f: base.wrk_conn_rate(f, seconds))
            lat = base.rounds(forwarders, args.rounds, base.ping_pong)
            measure = server_idle_memory if args.server else base.idle_memory
            memory = {f.name: measure(f, args.conns) for f in forwarders if f.name != "direct"}
        finally:
            for forwarder in forwarders:
                forwarder.stop()
            for client in clients:
                client.stop()
            for proc in targets.procs:
                proc.stop()
            sshd.kill()
    table = {
        f.name: {
            "gbps": base.median([v[0] for v in bulk[f.name]]),  # type: ignore[index]
            "cpu_s_per_gbit": base.median([v[1] for v in bulk[f.name]]),  # type: ignore[index]
            "conn_per_s": base.median([v[0] for v in conn[f.name]]),  # type: ignore[index]
            "cpu_us_per_conn": base.median([v[1] for v in conn[f.name]]),  # type: ignore[index]
            "p50_us": base.median([v[0] for v in lat[f.name]]),  # type: ignore[index]
            "idle_bytes": memory.get(f.name, float("nan")),
        }
        for f in forwarders
    }
    marker = MARKERS[args.server]
    report = render(table, args, marker)
    print(report)
    if args.before is not None:
        print(render_before(table, args.server))
    if args.write and args.before is None:
        results = base.HERE / "RESULTS.md"
        old = results.read_text() if results.exists() else ""
        analysis = ""  # the hand-written profile notes under the table are kept
        if marker in old:
            start = old.index(marker)
            end = old.find("\n## ", start + len(marker))
            section = old[start : end if end >= 0 else len(old)]
            if NOTES in section:
                analysis = "\n" + section[section.index(NOTES) :].strip("\n") + "\n"
            old = old[:start] + (old[end:] if end >= 0 else "")
        results.write_text(old.rstrip("\n") + "\n" + report + analysis)
    return 0


def render_before(table: dict[str, dict[str, float]], server: bool) -> str:
    """Both builds' ratios to OpenSSH for each cipher, and after / before (1.00 = no change)."""
    ours, theirs, old = (
        ("portfwd-server", "sshd", "before-server") if server else ("portfwd", "openssh", "before")
    )
    lines = ["| cipher | ratio to OpenSSH | before | after | after / before |", "|---|---|---|---|---|"]
    for short in CIPHERS:
        after, before, openssh = table[f"{ours}-{short}"], table[f"{old}-{short}"], table[f"{theirs}-{short}"]
        for label, key in (
            ("bulk Gbit/s", "gbps"),
            ("CPU per Gbit", "cpu_s_per_gbit"),
            ("conn/s", "conn_per_s"),
            ("CPU per conn", "cpu_us_per_conn"),
            ("p50 RTT", "p50_us"),
            ("RSS per idle conn", "idle_bytes"),
        ):
            was, now = before[key] / openssh[key], after[key] / openssh[key]
            lines.append(f"| {short} | {label} | {was:.3f} | {now:.3f} | {now / was:.3f} |")
    return "\n".join(lines) + "\n"


def render(table: dict[str, dict[str, float]], args: argparse.Namespace, marker: str) -> str:
    def fmt(value: float, digits: int = 2) -> str:
        return "n/a" if value != value else f"{value:,.{digits}f}"

    def ratio(top: float, bottom: float) -> float:
        return top / bottom if bottom and bottom == bottom and top == top else float("nan")

    direct = table["direct"]
    server = "server" in marker
    what = (
        "stock `ssh -L` through `portfwd server` and through OpenSSH's sshd on 127.0.0.1, same cipher; CPU and"
        " memory are the server's (sshd's session processes included)"
        if server
        else "`portfwd ssh -L` and OpenSSH `ssh -L` to one stock sshd on 127.0.0.1, same cipher; CPU and memory"
        " are the client process's"
    )
    flag = " --server" if server else ""
    lines = [
        marker.strip(),
        "",
        f"Measured {datetime.date.today().isoformat()} by `bench/tunnel.py{flag} --rounds {args.rounds} --seconds"
        f" {args.seconds:g} --conns {args.conns}`: {what}. Interleaved rounds, medians.",
        "",
        "| path | bulk Gbit/s | CPU s per Gbit | conn/s (HTTP, close) | p50 RTT µs | added p50 µs | RSS per idle conn (bytes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {fmt(row['gbps'])} | {fmt(row['cpu_s_per_gbit'], 3)} | {fmt(row['conn_per_s'], 0)} | "
            f"{fmt(row['p50_us'], 1)} | {fmt(row['p50_us'] - direct['p50_us'], 1)} | {fmt(row['idle_bytes'], 0)} |"
        )
    lines += [
        "",
        "| cipher | bulk vs OpenSSH (goal ≥ 0.6) | conn/s vs OpenSSH (goal ≥ 0.5) | added p50 vs OpenSSH"
        " | idle memory vs OpenSSH (goal ≤ 1.0) |",
        "|---|---|---|---|---|",
    ]
    for short in CIPHERS:
        if server:
            ours, theirs = table[f"portfwd-server-{short}"], table[f"sshd-{short}"]
        else:
            ours, theirs = table[f"portfwd-{short}"], table[f"openssh-{short}"]
        added = ratio(ours["p50_us"] - direct["p50_us"], theirs["p50_us"] - direct["p50_us"])
        lines.append(
            f"| {short} | {fmt(ratio(ours['gbps'], theirs['gbps']))} | {fmt(ratio(ours['conn_per_s'], theirs['conn_per_s']))} | "
            f"{fmt(added)} | {fmt(ratio(ours['idle_bytes'], theirs['idle_bytes']))} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
