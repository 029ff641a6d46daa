"""`workers`: portfwd in one process and in one per core, beside haproxy at its best, same run.

haproxy runs with `nbthread` = cores and `option splice-auto` (its fastest TCP relaying);
portfwd with `workers = 1` and `workers = cores` (the default; and with `reuseport = true`, a
socket per process instead of one shared accept queue), splice path, `-q`. Measures
conn/s (wrk, a new connection per request to an HTTP origin) and bulk with 4 streams (iperf3
-P 4), interleaved rounds; CPU counts every process of a forwarder (workers included).
Issue #22's goals: with workers = cores, conn/s >= 0.9x haproxy's and bulk >= 1.0x.

Usage: .venv/bin/python bench/workers.py [--rounds N] [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import run as base  # bench/run.py: Proc, Forwarder, start_targets, wrk_conn_rate, iperf_tcp, rounds


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    forwarders: list[base.Forwarder] = []
    with tempfile.TemporaryDirectory(prefix="pf-workers-") as tmp_text:
        tmp = Path(tmp_text)
        targets = base.start_targets(tmp)
        upstream = {"iperf": targets.iperf, "http": targets.http}
        try:
            # workers = cores with `reuseport = true`: a SO_REUSEPORT socket per process, as
            # before D30 gave the C engine's rules one shared accept queue.
            for workers, reuseport in ((1, False), (cores, False), (cores, True)):
                ports = {name: base.free_port() for name in upstream}
                config = tmp / f"workers-{workers}-{reuseport}.toml"
                config.write_text(
                    f"workers = {workers}\n[control]\nenabled = false\n"
                    + "".join(
                        f'[[forward]]\nlisten = "{base.LOCAL}:{ports[name]}"\nconnect = "{base.LOCAL}:{port}"\n'
                        'relay = "splice"\n'  # as root "auto" would give these rules to the kernel
                        + ("reuseport = true\n" if reuseport else "")
                        for name, port in upstream.items()
                    )
                )
                proc = base.Proc([str(base.REPO / ".venv/bin/portfwd"), "run", "-q", "-c", str(config)])
                name = f"portfwd workers={workers}" + (" reuseport" if reuseport else "")
                forwarders.append(base.Forwarder(name, ports, [proc]))
            ports = {name: base.free_port() for name in upstream}
            haproxy = tmp / "haproxy.cfg"
            haproxy.write_text(
                f"global\n  maxconn 4000\n  nbthread {cores}\ndefaults\n  mode tcp\n  option splice-auto\n"
                "  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
                + "".join(
                    f"frontend f_{name}\n  bind {base.LOCAL}:{ports[name]}\n  default_backend b_{name}\n"
                    f"backend b_{name}\n  server s {base.LOCAL}:{port}\n"
                    for name, port in upstream.items()
                )
            )
            forwarders.append(
                base.Forwarder(
                    f"haproxy nbthread={cores}", ports, [base.Proc(["haproxy", "-f", str(haproxy), "-db"])]
                )
            )
            for forwarder in forwarders:
                base.wait_tcp(forwarder.ports["http"])
                base.wait_listening(forwarder.ports["iperf"])  # a probe of iperf3's port would be its client
            conn = base.rounds(forwarders, args.rounds, lambda f: base.wrk_conn_rate(f, args.seconds))
            bulk = base.rounds(forwarders, args.rounds, lambda f: base.iperf_tcp(f, 4, args.seconds))
        finally:
            for forwarder in forwarders:
                forwarder.stop()
            for proc in targets.procs:
                proc.stop()
    table = {}
    for forwarder in forwarders:
        name = forwarder.name
        table[name] = (
            base.median([v[0] for v in conn[name]]),  # type: ignore[index]
            base.median([v[1] for v in conn[name]]),  # type: ignore[index]
            base.median([v[0] for v in bulk[name]]),  # type: ignore[index]
            base.median([v[1] for v in bulk[name]]),  # type: ignore[index]
        )
    print(
        f"| forwarder ({cores} cores) | conn/s | CPU µs per conn | bulk 4 streams Gbit/s | CPU s per Gbit |"
    )
    print("|---|---|---|---|---|")
    for name, (rate, cpu, gbps, per_gbit) in table.items():
        print(f"| {name} | {rate:,.0f} | {cpu:.1f} | {gbps:.2f} | {per_gbit:.3f} |")
    reference = f"haproxy nbthread={cores}"
    haproxy_row = table[reference]
    for name in (f"portfwd workers={cores}", "portfwd workers=1", f"portfwd workers={cores} reuseport"):
        row = table[name]
        paired = base.by_round(conn, name, reference)
        print(
            f"{name} / haproxy: conn/s {row[0] / haproxy_row[0]:.3f}, by round {paired:.3f} "
            f"(goal >= 0.9 with workers = cores), bulk {row[2] / haproxy_row[2]:.3f} (goal >= 1.0)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
