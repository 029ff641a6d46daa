"""Router mapping benchmark (#8): time from "map this port" to a port reachable from wan.

Runs miniupnpd on the lab's gw (TESTBED §3) and, from lan, for each method: the whole
`portfwd map add` command (interpreter start included), the same request inside a running
portfwd (what `portfwd run` pays: the router exchange only), and the stock C clients as the
baseline in the same run (`natpmpc` for NAT-PMP and PCP, which has no Debian client;
`upnpc -u URL` for UPnP). Every mapping is checked reachable from wan, then removed.
Medians of N rounds. Needs root.

Usage: .venv/bin/python bench/router.py [--rounds N] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.integration.miniupnpd import URL, router  # noqa: E402
from tests.integration.topology import GW_LAN, GW_WAN, Lab, lab  # noqa: E402

MARKER = "\n## Router mapping (issue #8)"

IN_PROCESS = """
import asyncio, json, sys, time
sys.path.insert(0, SRC)
from portfwd.router.base import MapRequest, default_route
from portfwd.router.choose import make
from portfwd.router.udp import exchange

async def main():
    method, port, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    route = default_route()
    m = make(method, route, exchange, upnp_url=URL)
    if method == "upnp":
        await m.external_address()  # the description is fetched once per process
    times = []
    for i in range(rounds):
        request = MapRequest("tcp", 8000, port + i, 600)
        began = time.perf_counter()
        granted = await m.add(request)
        times.append(time.perf_counter() - began)
        await m.remove(request, granted)
    await m.close()
    print(json.dumps(times))

asyncio.run(main())
""".replace("SRC", repr(str(HERE.parent / "src"))).replace("URL", repr(URL))


#: Times one command from inside lan, so `ip netns exec` and `env` are not in the number.
TIMER = """
import subprocess, sys, time
began = time.perf_counter()
result = subprocess.run(sys.argv[1:], capture_output=True)
took = time.perf_counter() - began
sys.stderr.buffer.write(result.stdout + result.stderr)
print(took)
sys.exit(result.returncode)
"""


def timed(net: Lab, state: str, *argv: str) -> float:
    """Seconds `argv` took in lan, with `state` (NAME=value) in its environment."""
    result = net.run(net.lan, "env", state, sys.executable, "-c", TIMER, *argv, timeout=60)
    if result.returncode != 0:
        raise SystemExit(f"{argv}: {result.stderr.decode()}")
    return float(result.stdout)


def reachable(net: Lab, port: int) -> None:
    out = net.run(net.wan, "socat", "-T", "5", "-", f"TCP4:{GW_WAN}:{port},connect-timeout=2", data=b"x\n")
    if b"ok" not in out.stdout:
        raise SystemExit(f"port {port} not reachable from wan: {out.stdout!r} {out.stderr!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--write", action="store_true", help="record the result in bench/RESULTS.md")
    args = parser.parse_args()
    python = str(HERE.parent / ".venv" / "bin" / "python")
    cli = [str(HERE.parent / ".venv" / "bin" / "portfwd"), "map"]
    results: dict[str, dict[str, float]] = {}
    with lab() as net, tempfile.TemporaryDirectory() as tmp, router(net, Path(tmp)):
        net.serve(net.lan, 8000, "echo ok")
        state = f"PORTFWD_STATE_DIR={tmp}/state"
        for index, method in enumerate(("pcp", "natpmp", "upnp")):
            base = 20000 + index * 1000
            url = ["--upnp-url", URL] if method == "upnp" else []
            command, baseline = [], []
            for i in range(args.rounds):
                port = base + i
                command.append(
                    timed(net, state, *cli, "add", "8000/tcp", "--external", str(port), "--method", method,
                          "--lease", "10m", *url)
                )  # fmt: skip
                reachable(net, port)
                timed(
                    net,
                    state,
                    *cli,
                    "remove",
                    "8000/tcp",
                    "--external",
                    str(port),
                    "--method",
                    method,
                    *url,
                )
                port = base + 500 + i
                if method == "upnp":
                    baseline.append(timed(net, state, "upnpc", "-u", URL, "-i", "-e", "bench", "-a", "192.168.77.10",
                                          "8000", str(port), "TCP", "600"))  # fmt: skip
                    reachable(net, port)
                    timed(net, state, "upnpc", "-u", URL, "-i", "-d", str(port), "TCP")
                else:
                    baseline.append(
                        timed(net, state, "natpmpc", "-g", GW_LAN, "-a", str(port), "8000", "tcp", "600")
                    )
                    reachable(net, port)
                    timed(net, state, "natpmpc", "-g", GW_LAN, "-a", str(port), "8000", "tcp", "0")
            out = net.run(
                net.lan, "env", state, python, "-c", IN_PROCESS, method, str(base + 800), str(args.rounds)
            )
            inside = json.loads(out.stdout)
            results[method] = {
                "command_ms": statistics.median(command) * 1000,
                "baseline_ms": statistics.median(baseline) * 1000,
                "in_process_ms": statistics.median(inside) * 1000,
            }
            print(method, json.dumps({k: round(v, 1) for k, v in results[method].items()}), flush=True)
    names = {"pcp": "PCP", "natpmp": "NAT-PMP", "upnp": "UPnP (known URL)"}
    goal = {"pcp": 50, "natpmp": 50, "upnp": 300}
    lines = [
        MARKER,
        "",
        f"`bench/router.py --rounds {args.rounds}`, {datetime.date.today()}, miniupnpd 2.3.1 on the lab's gw;",
        "median time until the mapping exists (each checked reachable from wan). Baseline: the stock C",
        "client in the same run (natpmpc for NAT-PMP and PCP, upnpc -u for UPnP), each timed from inside",
        "lan from exec to exit. The command is the installed `portfwd` script; for PCP and NAT-PMP",
        "it loads click and the router drivers only (no rich, pydantic or asyncio), so its time is mostly CPython starting.",
        "",
        "| method | inside portfwd | `portfwd map add` command | stock client command | goal |",
        "|---|---|---|---|---|",
    ]
    for method, row in results.items():
        inside = row["in_process_ms"]
        lines.append(
            f"| {names[method]} | {inside:.1f} ms | {row['command_ms']:.0f} ms "
            f"({row['command_ms'] / row['baseline_ms']:.1f}\u00d7 the stock client) | {row['baseline_ms']:.0f} ms | "
            f"≤ {goal[method]} ms: {'met' if inside <= goal[method] else 'NOT met'} inside portfwd, "
            f"{'met' if row['command_ms'] <= goal[method] else 'not met'} by the command |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        path = HERE / "RESULTS.md"
        current = path.read_text()
        if MARKER in current:
            start = current.index(MARKER)
            end = current.find("\n## ", start + len(MARKER))
            current = current[:start] + (current[end:] if end != -1 else "")
        path.write_text(current.rstrip("\n") + "\n" + text)


if __name__ == "__main__":
    main()
