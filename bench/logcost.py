"""What the per-session log costs: `portfwd forward` as a user starts it, beside `-q`, same run.

Two log lines a connection (open, closed) at INFO by default. Both forwarders relay to the
same HTTP target; wrk makes one new connection per request. The default one's stderr is a file
(what a service's journal or a redirect is), so its lines are really written; every line is
counted at the end, none may be missing. Interleaved rounds; reported as conn/s and CPU per
connection, and the ratio default / -q (issue #22's goal: the log costs at most 5 %).

Usage: .venv/bin/python bench/logcost.py [--rounds N] [--seconds S] [--path splice|protocol]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import run as base  # bench/run.py: targets, measurements, rounds, medians


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--path", choices=("splice", "protocol"), default="splice")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pf-logcost-") as tmp_text:
        tmp = Path(tmp_text)
        targets = base.start_targets(tmp)
        forwarders: list[base.Forwarder] = []
        logs = tmp / "default.log"
        try:
            for name, quiet in (("default", False), ("quiet", True)):
                port = base.free_port()
                config = tmp / f"{name}.toml"
                config.write_text(
                    f'[control]\nenabled = false\n[[forward]]\nlisten = "{base.LOCAL}:{port}"\n'
                    f'connect = "{base.LOCAL}:{targets.http}"\nrelay = "{args.path}"\n'
                )
                argv = [
                    str(base.REPO / ".venv/bin/portfwd"),
                    "run",
                    "-c",
                    str(config),
                    *(["-q"] if quiet else []),
                ]
                # stderr to a file, as a service's journal or a redirect takes it (`sh` execs portfwd)
                proc = base.Proc(
                    ["sh", "-c", 'exec "$@" 2>>"$0"', str(logs if not quiet else "/dev/null"), *argv]
                )
                forwarders.append(base.Forwarder(name, {"http": port}, [proc]))
            for forwarder in forwarders:
                base.wait_tcp(forwarder.ports["http"])
            conn = base.rounds(forwarders, args.rounds, lambda f: base.wrk_conn_rate(f, args.seconds))
        finally:
            for forwarder in forwarders:
                forwarder.stop()
            for proc in targets.procs:
                proc.stop()
        text = logs.read_text(errors="replace")
    table = {
        name: (base.median([v[0] for v in values]), base.median([v[1] for v in values]))  # type: ignore[index]
        for name, values in conn.items()
    }
    print(f"| forwarder ({args.path}) | conn/s | CPU µs per conn |")
    print("|---|---|---|")
    for name, (rate, cpu) in table.items():
        print(f"| {name} | {rate:,.0f} | {cpu:.1f} |")
    print(
        f"\ndefault / -q: conn/s {table['default'][0] / table['quiet'][0]:.3f} "
        f"(by round {base.by_round(conn, 'default', 'quiet'):.3f}), "
        f"CPU per conn {table['default'][1] / table['quiet'][1]:.3f}"
    )
    opened, closed = text.count(" open ("), text.count(" closed (")
    print(f"log lines written: {opened} open, {closed} closed (equal: none lost)")
    return 0 if opened == closed else 1


if __name__ == "__main__":
    sys.exit(main())
