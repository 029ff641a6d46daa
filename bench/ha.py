"""Gateway HA benchmark (issue #23): failover time and bytes lost when the master's links are cut.

Each round builds the two-gateway lab of tests/integration/test_gateway_ha.py (keepalived +
conntrackd run by HASupervisor, the HA ruleset loaded by hand), streams 24 MiB paced over ~8 s
through the virtual address, cuts the master's WAN and LAN ports on the switch, and reports the
time from the cut to the first byte after the silence, and the bytes that never arrived (goal 0).
Both directions: WAN -> LAN through DNAT, LAN -> WAN through SNAT to the virtual WAN address.

Usage: .venv/bin/python bench/ha.py [--rounds N]   (needs root, keepalived, conntrackd)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "src"))

from tests.integration import test_gateway_ha as lab  # noqa: E402


def one(inbound: bool) -> lab.Failover:
    with lab.ha_lab() as net:
        for gw in ("gw1", "gw2"):
            lab.load_ruleset(net, gw)
        ha = {"gw1": lab.start_ha(net, "gw1")}
        ha["gw1"].wait_for("role master", timeout=15)
        ha["gw2"] = lab.start_ha(net, "gw2")
        ha["gw2"].wait_for("role backup", timeout=15)
        return lab.transfer_across_failover(net, ha, inbound)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"advert_interval {lab.ADVERT}s, {lab.SIZE >> 20} MiB at {lab.RATE >> 20} MiB/s per round")
    print(f"{'direction':<22} {'round':>5} {'failover ms':>12} {'bytes lost':>11} {'sha256':>7}")
    for inbound, name in ((True, "wan->lan (dnat)"), (False, "lan->wan (snat)")):
        times = []
        for index in range(args.rounds):
            outcome = one(inbound)
            times.append(outcome.seconds * 1000)
            same = "same" if outcome.same else "DIFF"
            print(f"{name:<22} {index + 1:>5} {times[-1]:>12.0f} {outcome.lost:>11} {same:>7}", flush=True)
        print(f"{name:<22} {'median':>5} {statistics.median(times):>12.0f}")


if __name__ == "__main__":
    main()
