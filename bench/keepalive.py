"""What TCP keepalive on both sides of every session costs: conn/s and CPU per connection.

Issue #19 turned keepalive on by default (4 setsockopt calls on each upstream socket; clients
inherit it from the listener). This measures that price: portfwd (splice) with
`tcp_keepalive = true` against the same build with `false`, and haproxy (its default, which
sets no keepalive) as the reference, in interleaved rounds of wrk with one new TCP
connection per request, all on 127.0.0.1.

Usage: .venv/bin/python bench/keepalive.py [--rounds N] [--seconds S] [--write]
Needs: haproxy, wrk.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as base  # noqa: E402  (bench/run.py: processes, targets, wrk, rounds)

MARKER = "\n## TCP keepalive (issue #19)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="append the result to bench/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        targets = base.start_targets(tmp)
        forwarders: list[base.Forwarder] = []
        try:
            for keep in ("true", "false"):
                port = base.free_port()
                config = tmp / f"keepalive-{keep}.toml"
                config.write_text(
                    f'[[forward]]\nlisten = "{base.LOCAL}:{port}"\nconnect = "{base.LOCAL}:{targets.http}"\n'
                    f"tcp_keepalive = {keep}\n[control]\nenabled = false\n"
                )
                proc = base.Proc([str(base.REPO / ".venv/bin/portfwd"), "run", "-q", "-c", str(config)])
                forwarders.append(base.Forwarder(f"portfwd keepalive={keep}", {"http": port}, [proc]))
            port = base.free_port()
            haproxy_cfg = tmp / "haproxy.cfg"
            haproxy_cfg.write_text(
                "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n"
                f"  timeout server 1h\nfrontend f\n  bind {base.LOCAL}:{port}\n  default_backend b\n"
                f"backend b\n  server s {base.LOCAL}:{targets.http}\n"
            )
            haproxy = base.Proc(["haproxy", "-f", str(haproxy_cfg), "-db"])
            forwarders.append(base.Forwarder("haproxy", {"http": port}, [haproxy]))
            for forwarder in forwarders:
                base.wait_tcp(forwarder.ports["http"])
            results = base.rounds(
                forwarders, args.rounds, lambda f: base.wrk_conn_rate(f, max(1, round(args.seconds)))
            )
        finally:
            for forwarder in forwarders:
                forwarder.stop()
            for proc in targets.procs:
                proc.stop()
    rows = {}
    for name, values in results.items():
        rates = [value[0] for value in values]  # type: ignore[index]
        cpus = [value[1] for value in values]  # type: ignore[index]
        rows[name] = (base.median(rates), base.median(cpus))
    on, off, haproxy_row = rows["portfwd keepalive=true"], rows["portfwd keepalive=false"], rows["haproxy"]
    lines = [
        MARKER.strip(),
        "",
        f"Measured {datetime.date.today().isoformat()} by `bench/keepalive.py --rounds {args.rounds} "
        f"--seconds {args.seconds:g}` (medians of interleaved rounds; wrk -c32, one connection per request):",
        "",
        "| forwarder | conn/s | CPU µs per connection |",
        "|---|---|---|",
        *(f"| {name} | {rate:,.0f} | {cpu:.1f} |" for name, (rate, cpu) in rows.items()),
        "",
        f"keepalive on / off: conn/s {on[0] / off[0]:.3f}, CPU per connection {on[1] / off[1]:.3f}; "
        f"on / haproxy: conn/s {on[0] / haproxy_row[0]:.2f}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        path = HERE / "RESULTS.md"
        current = path.read_text()
        if MARKER in current:
            current = current[: current.index(MARKER)]
        path.write_text(current.rstrip("\n") + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
