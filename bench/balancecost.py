"""What balancing over two backends costs in conn/s against one backend, same run (#22: <= 3 %).

The origin is one haproxy answering HTTP 200 on two frontends; the one-backend rule goes to the
first, the two-backend rule round-robins over both (and a third rule adds active health checks,
every second, to see that checks cost nothing measurable). Interleaved rounds, `-q`.

Usage: .venv/bin/python bench/balancecost.py [--rounds N] [--seconds S] [--path splice|protocol]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import run as base  # bench/run.py: Proc, free_port, wait_tcp, wrk_conn_rate, rounds, median


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--path", choices=("splice", "protocol"), default="splice")
    parser.add_argument("--balance", default="round-robin")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pf-balancecost-") as tmp_text:
        tmp = Path(tmp_text)
        first, second = base.free_port(), base.free_port()
        origin = tmp / "origin.cfg"
        origin.write_text(
            "global\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n"
            "  timeout server 30s\n"
            f"frontend first\n  bind {base.LOCAL}:{first}\n"
            '  http-request return status 200 content-type text/plain string "ok"\n'
            f"frontend second\n  bind {base.LOCAL}:{second}\n"
            '  http-request return status 200 content-type text/plain string "ok"\n'
        )
        procs = [base.Proc(["haproxy", "-f", str(origin), "-db"])]
        forwarders: list[base.Forwarder] = []
        one = f'"{base.LOCAL}:{first}"'
        two = f'["{base.LOCAL}:{first}", "{base.LOCAL}:{second}"]\nbalance = "{args.balance}"'
        try:
            base.wait_tcp(first)
            base.wait_tcp(second)
            for name, connect in (
                ("one backend", one),
                ("two backends", two),
                ("two, checked", two + '\n[forward.health]\ninterval = "1s"'),
            ):
                port = base.free_port()
                config = tmp / f"{port}.toml"
                config.write_text(
                    f'[control]\nenabled = false\n[[forward]]\nlisten = "{base.LOCAL}:{port}"\n'
                    f'relay = "{args.path}"\nconnect = {connect}\n'
                )
                proc = base.Proc([str(base.REPO / ".venv/bin/portfwd"), "run", "-q", "-c", str(config)])
                forwarders.append(base.Forwarder(name, {"http": port}, [proc]))
            for forwarder in forwarders:
                base.wait_tcp(forwarder.ports["http"])
            conn = base.rounds(forwarders, args.rounds, lambda f: base.wrk_conn_rate(f, args.seconds))
        finally:
            for forwarder in forwarders:
                forwarder.stop()
            for proc in procs:
                proc.stop()
    table = {
        name: (base.median([v[0] for v in values]), base.median([v[1] for v in values]))  # type: ignore[index]
        for name, values in conn.items()
    }
    print(f"| rule ({args.path}, {args.balance}, -q) | conn/s | CPU µs per conn |")
    print("|---|---|---|")
    for name, (rate, cpu) in table.items():
        print(f"| {name} | {rate:,.0f} | {cpu:.1f} |")
    one_rate, one_cpu = table["one backend"]
    for name in ("two backends", "two, checked"):
        rate, cpu = table[name]
        paired = base.by_round(conn, name, "one backend")
        print(
            f"{name} / one backend: conn/s {rate / one_rate:.3f} (by round {paired:.3f}), "
            f"CPU per conn {cpu / one_cpu:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
