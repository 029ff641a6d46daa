"""What `proxy_protocol = "v2"` costs in conn/s: the same rule with and without the header, same run.

The origin is haproxy answering HTTP 200 on two frontends that differ only in `accept-proxy`
(haproxy reads the header on one and not the other), so the origin's own work is the same but
for reading the header. Interleaved rounds, `-q` (issue #22's goal: PROXY v2 costs at most 2 %).

Usage: .venv/bin/python bench/proxycost.py [--rounds N] [--seconds S] [--path splice|protocol]
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pf-proxycost-") as tmp_text:
        tmp = Path(tmp_text)
        plain, proxied = base.free_port(), base.free_port()
        origin = tmp / "origin.cfg"
        origin.write_text(
            "global\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n"
            "  timeout server 30s\n"
            f"frontend plain\n  bind {base.LOCAL}:{plain}\n"
            '  http-request return status 200 content-type text/plain string "ok"\n'
            f"frontend proxied\n  bind {base.LOCAL}:{proxied} accept-proxy\n"
            '  http-request return status 200 content-type text/plain string "ok"\n'
        )
        procs = [base.Proc(["haproxy", "-f", str(origin), "-db"])]
        forwarders: list[base.Forwarder] = []
        try:
            base.wait_tcp(plain)
            base.wait_listening(proxied)  # a probe without a header would be an error on it
            for name, target, header in (
                ("no header", plain, ""),
                ("PROXY v2", proxied, 'proxy_protocol = "v2"\n'),
            ):
                port = base.free_port()
                config = tmp / f"{port}.toml"
                config.write_text(
                    f'[control]\nenabled = false\n[[forward]]\nlisten = "{base.LOCAL}:{port}"\n'
                    f'connect = "{base.LOCAL}:{target}"\nrelay = "{args.path}"\n{header}'
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
    print(f"| rule ({args.path}, -q) | conn/s | CPU µs per conn |")
    print("|---|---|---|")
    for name, (rate, cpu) in table.items():
        print(f"| {name} | {rate:,.0f} | {cpu:.1f} |")
    plain_rate, plain_cpu = table["no header"]
    proxy_rate, proxy_cpu = table["PROXY v2"]
    print(
        f"\nPROXY v2 / no header: conn/s {proxy_rate / plain_rate:.3f} "
        f"(by round {base.by_round(conn, 'PROXY v2', 'no header'):.3f}), CPU per conn {proxy_cpu / plain_cpu:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
