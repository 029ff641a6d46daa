"""What `[web]` costs the relays: the same rule with [web] off, on and unwatched, and on with the
dashboard's stream read, each its own portfwd process, same run.

The issue's goals: with the dashboard open and updating (one status event a second), conn/s and
bulk cost at most 2 % against [web] off; with [web] on and nobody watching, nothing measurable
(at most 0.5 %). The watcher is `curl -sN .../api/v1/events`, started before and stopped (by
PID) after each measurement of that configuration; the status events it got while measuring are
counted: none in the whole run fails it, none in one measurement is flagged. `--browser` adds a fourth
process watched by headless chromium with the page open; chromium's own CPU competes with the
relays on a small machine, so that row is printed apart and judged by no goal.

Measured in interleaved rounds (the order shuffled per round), medians: conn/s (wrk, a new
connection per request to an HTTP origin), bulk with 1 and 4 streams (iperf3), and CPU of every
process of a forwarder (workers included) per connection and per Gbit. Ratios are
configuration / web off. `-q`; `workers` as the user gets it (auto) unless `--workers N`.
The relay path is splice by default (in portfwd's own process, beside [web]: where [web] can
slow the relays); `--path auto` leaves `relay` unset, which as root with nftables is the kernel
relay, whose connections never reach portfwd's process.
`--twin` adds a second [web]-off process, an A/A control: its ratio to web off is pure noise.

Usage: .venv/bin/python bench/web.py [--rounds N] [--seconds S] [--workers N]
       [--path splice|protocol|auto|kernel] [--browser] [--twin]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import run as base  # bench/run.py: Proc, Forwarder, start_targets, wrk_conn_rate, iperf_tcp, rounds

OFF, IDLE, OPEN, BROWSER, TWIN = (
    "web off",
    "web on, nobody watching",
    "web on, dashboard open",
    "web on, browser open",
    "web off (twin)",
)
CHROMIUM = "/usr/bin/chromium"

#: (label, measurement, index in its result, higher is better).
METRICS = (
    ("conn/s", "conn", 0, True),
    ("CPU µs per conn", "conn", 1, False),
    ("bulk 1 stream Gbit/s", "tcp1", 0, True),
    ("CPU s per Gbit (1 stream)", "tcp1", 1, False),
    ("bulk 4 streams Gbit/s", "tcp4", 0, True),
    ("CPU s per Gbit (4 streams)", "tcp4", 1, False),
)
#: The metrics a goal is judged on (the relays' speed); CPU is reported beside them.
JUDGED = ("conn/s", "bulk 1 stream Gbit/s", "bulk 4 streams Gbit/s")


@dataclass
class Setup:
    """One portfwd process, its [web] port (None: off), what watches it, and its stderr file."""

    forwarder: base.Forwarder
    web: int | None
    watcher: str | None  # None, "curl" or "browser"
    log: Path
    seen: list[int] = field(default_factory=list)  # per measurement: status events / bytes got
    sizes: list[float] = field(default_factory=list)  # curl: bytes per status event, per measurement
    stopped_in: float = float("nan")


def stream_bytes(port: int) -> dict[str, int]:
    """Bytes acknowledged on each open connection of the [web] listener on `port`, by peer."""
    out = subprocess.run(
        ["ss", "-Htni", "state", "established", f"sport = :{port}"], capture_output=True, text=True
    ).stdout
    sent: dict[str, int] = {}
    peer = ""
    for line in out.splitlines():
        if line and not line[0].isspace():
            peer = line.split()[-1]
        elif peer and (found := re.search(r"bytes_acked:(\d+)", line)):
            sent[peer] = int(found.group(1))
    return sent


def grown(before: dict[str, int], after: dict[str, int]) -> int:
    """Bytes sent between two stream_bytes() readings, on the connections open at the second."""
    return sum(count - before.get(peer, 0) for peer, count in after.items())


class Watcher:
    """A curl reading /api/v1/events into a file, or chromium with the page open; ours, by PID."""

    def __init__(self, kind: str, port: int, tmp: Path) -> None:
        self.kind, self.port = kind, port
        url = f"http://{base.LOCAL}:{port}/"
        self.out = tmp / f"events-{port}.txt"
        if kind == "curl":
            self.out.write_bytes(b"")
            argv = ["curl", "-sN", "-o", str(self.out), url + "api/v1/events"]
        else:
            argv = [
                CHROMIUM,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                f"--user-data-dir={tmp / 'chromium'}",
                "--no-first-run",
                url,
            ]
        self.proc = base.Proc(argv)
        self.events = 0
        self.sent: dict[str, int] = {}

    def count(self) -> int:
        return self.out.read_bytes().count(b"event: status\n")

    def wait_live(self, timeout: float = 30.0) -> None:
        """Until the stream flows: curl has its first status event; the page's connections got
        bytes in two windows of 1.2 s in a row (a tick comes each second once the page loaded)."""
        deadline = time.monotonic() + timeout
        growing = 0
        while time.monotonic() < deadline:
            if self.proc.popen.poll() is not None:
                raise SystemExit(f"bench: the {self.kind} watcher exited ({self.proc.popen.returncode})")
            if self.kind == "curl":
                if (events := self.count()) > 0:
                    self.events = events
                    return
                time.sleep(0.05)
                continue
            before = stream_bytes(self.port)
            time.sleep(1.2)
            self.sent = stream_bytes(self.port)
            growing = growing + 1 if grown(before, self.sent) > 0 else 0
            if growing >= 2:
                return
        raise SystemExit(f"bench: the {self.kind} watcher got no events in {timeout:g} s")

    def stop(self) -> tuple[int, float]:
        """Stop it; what it got since wait_live: status events (curl) or stream bytes (browser),
        and (curl) the mean size of a status event in bytes."""
        if self.kind == "curl":
            data = self.out.read_bytes()
            got, size = self.count() - self.events, len(data) / max(1, data.count(b"event: status\n"))
        else:
            got, size = grown(self.sent, stream_bytes(self.port)), float("nan")
        self.proc.stop()
        return got, size


def start_setups(
    targets: base.Targets, tmp: Path, args: argparse.Namespace, setups: dict[str, Setup]
) -> None:
    """One portfwd per configuration, appended to `setups` as it goes so the caller stops them."""
    names = [OFF, IDLE, OPEN] + ([BROWSER] if args.browser else []) + ([TWIN] if args.twin else [])
    upstream = {"iperf": targets.iperf, "http": targets.http}
    head = (f"workers = {args.workers}\n" if args.workers else "") + "[control]\nenabled = false\n"
    relay = f'relay = "{args.path}"\n' if args.path != "auto" else ""
    token = secrets.token_hex(16)
    for index, name in enumerate(names):
        ports = {key: base.free_port() for key in upstream}
        web = base.free_port() if name not in (OFF, TWIN) else None
        text = head + "".join(
            f'[[forward]]\nlisten = "{base.LOCAL}:{ports[key]}"\nconnect = "{base.LOCAL}:{port}"\n{relay}'
            for key, port in upstream.items()
        )
        if web is not None:
            text += f'[web]\nlisten = "{base.LOCAL}:{web}"\ntoken = "{token}"\n'
        config = tmp / f"config-{index}.toml"
        config.write_text(text)
        log = tmp / f"stderr-{index}.txt"
        argv = [str(base.REPO / ".venv/bin/portfwd"), "run", "-q", "-c", str(config)]
        # stderr to a file, to show anything portfwd says with -q (`sh` execs portfwd: same PID)
        proc = base.Proc(["sh", "-c", 'exec "$@" 2>>"$0"', str(log), *argv])
        watcher = {OPEN: "curl", BROWSER: "browser"}.get(name)
        setups[name] = Setup(base.Forwarder(name, ports, [proc]), web, watcher, log)
    for setup in setups.values():
        base.wait_tcp(setup.forwarder.ports["http"])
        if args.path in ("splice", "protocol"):  # (a kernel relay has no listener to see)
            base.wait_listening(setup.forwarder.ports["iperf"])  # a probe would be iperf3's client
        if setup.web is not None:
            base.wait_tcp(setup.web)


def watched(
    setups: dict[str, Setup], tmp: Path, measure: Callable[[base.Forwarder], tuple[float, float]]
) -> Callable[[base.Forwarder], tuple[float, float]]:
    """`measure`, with the configuration's watcher running for exactly that measurement."""

    def run(forwarder: base.Forwarder) -> tuple[float, float]:
        setup = setups[forwarder.name]
        if setup.watcher is None or setup.web is None:
            return measure(forwarder)
        watcher = Watcher(setup.watcher, setup.web, tmp)
        try:
            watcher.wait_live()
            result = measure(forwarder)
        finally:
            got, size = watcher.stop()
            setup.seen.append(got)
            setup.sizes.append(size)
        return result

    return run


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--workers", type=int, help="pin `workers` (default: unset, i.e. auto)")
    parser.add_argument(
        "--path",
        choices=("splice", "protocol", "auto", "kernel"),
        default="splice",
        help="`relay` of the rules (auto: unset, as the user gets it; kernel as root)",
    )
    parser.add_argument("--browser", action="store_true", help="add headless chromium with the page open")
    parser.add_argument("--twin", action="store_true", help="add a second [web]-off process (A/A control)")
    parser.add_argument("--write", action="store_true", help="accepted; writes nothing (prints only)")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 100 or not 1 <= args.seconds <= 600:
        parser.error("--rounds 1..100, --seconds 1..600")
    if args.workers is not None and not 1 <= args.workers <= 64:
        parser.error("--workers 1..64")
    needed = ["iperf3", "haproxy", "wrk", "curl", "ss"] + ([CHROMIUM] if args.browser else [])
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        print(f"bench: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    setups: dict[str, Setup] = {}
    results: dict[str, dict[str, list[object]]] = {}
    early: dict[str, int] = {}
    logs: dict[str, str] = {}
    seconds = args.seconds
    failed = False
    with tempfile.TemporaryDirectory(prefix="pf-web-") as tmp_text:
        tmp = Path(tmp_text)
        targets = base.start_targets(tmp)
        try:
            start_setups(targets, tmp, args, setups)
            forwarders = [setup.forwarder for setup in setups.values()]
            measures = {
                "conn": lambda f: base.wrk_conn_rate(f, seconds),
                "tcp1": lambda f: base.iperf_tcp(f, 1, seconds),
                "tcp4": lambda f: base.iperf_tcp(f, 4, seconds),
            }
            for key, measure in measures.items():
                results[key] = base.rounds(forwarders, args.rounds, watched(setups, tmp, measure))
        except BaseException:
            failed = True
            raise
        finally:
            for name, setup in setups.items():
                code = setup.forwarder.procs[0].popen.poll()
                if code is not None:
                    early[name] = code
                began = time.monotonic()
                setup.forwarder.stop()
                setup.stopped_in = time.monotonic() - began
            for proc in targets.procs:
                proc.stop()
            for name, setup in setups.items():
                logs[name] = setup.log.read_text(errors="replace") if setup.log.exists() else ""
                if failed and logs[name].strip():
                    print(f"bench: stderr of {name}:\n{logs[name]}", file=sys.stderr)
    return report(args, setups, results, early, logs)


def report(
    args: argparse.Namespace,
    setups: dict[str, Setup],
    results: dict[str, dict[str, list[object]]],
    early: dict[str, int],
    logs: dict[str, str],
) -> int:
    def fmt(value: float, digits: int = 2) -> str:
        return "n/a" if value != value else f"{value:,.{digits}f}"

    def values(name: str, key: str, index: int) -> list[float]:
        return [v[index] for v in results[key][name]]  # type: ignore[index]

    def cost(ratio: float, higher: bool) -> float:
        """What a ratio to web off costs, in %: positive is slower (or more CPU)."""
        return (1 - ratio if higher else ratio - 1) * 100

    def spread(numbers: list[float]) -> float:
        """(max - min) / median of the rounds, in %; NaN with fewer than two."""
        good = [n for n in numbers if n == n]
        middle = base.median(good)
        return (max(good) - min(good)) / middle * 100 if len(good) > 1 and middle else float("nan")

    info = base.versions()
    cores = os.cpu_count() or 1
    workers = args.workers if args.workers else f"auto ({cores})"
    print(
        f"# [web]'s cost to the relays: bench/web.py --rounds {args.rounds} --seconds {args.seconds}"
        f"{' --browser' if args.browser else ''}{' --twin' if args.twin else ''}\n"
        f"{info['portfwd']}, workers = {workers}, relay = {args.path}, -q, cores {cores}, "
        f"kernel {info['kernel']}, python {info['python']}; interleaved rounds, medians; "
        "ratio = configuration / web off\n"
    )
    main_names = [name for name in setups if name != BROWSER]
    medians = {
        name: {label: base.median(values(name, key, index)) for label, key, index, _ in METRICS}
        for name in setups
    }

    def table(names: list[str]) -> None:
        print("| configuration | " + " | ".join(label for label, *_ in METRICS) + " |")
        print("|---|" + "---|" * len(METRICS))
        for name in names:
            cells = []
            for label, _, _, _ in METRICS:
                value, off = medians[name][label], medians[OFF][label]
                digits = 0 if label == "conn/s" else (1 if "µs" in label else (3 if "CPU" in label else 2))
                cell = fmt(value, digits)
                if name != OFF:
                    cell += f" ({fmt(value / off if off else float('nan'), 3)})"
                cells.append(cell)
            print(f"| {name} | " + " | ".join(cells) + " |")

    table(main_names)
    if BROWSER in setups:
        print(
            "\nWith headless chromium showing the page (apart: chromium's own CPU, not counted in"
            " the CPU columns, competes with the relays for this machine's cores):\n"
        )
        table([OFF, BROWSER])

    print("\nPer round (rounds in order; each round's configurations in shuffled order):\n")
    for label, key, index, _ in METRICS:
        off_rounds = values(OFF, key, index)
        for name in setups:
            rounds = values(name, key, index)
            text = ", ".join(fmt(v, 3 if "CPU" in label and "µs" not in label else 1) for v in rounds)
            if name != OFF:
                ratios = ", ".join(
                    fmt(v / o if o else float("nan"), 3) for v, o in zip(rounds, off_rounds, strict=True)
                )
                text += f"  | / web off same round: {ratios}"
            print(f"  {label:<27} {name:<24} {text}")

    print("\nVerdicts (medians; cost = slower, or more CPU, than web off, in %):")
    noise = {label: spread(values(OFF, key, index)) for label, key, index, _ in METRICS}
    for name, goal in ((OPEN, 2.0), (IDLE, 0.5)):
        costs = {
            label: cost(medians[name][label] / medians[OFF][label], higher)
            if medians[OFF][label]
            else float("nan")
            for label, _, _, higher in METRICS
        }
        judged = [costs[label] for label in JUDGED]
        met = all(c == c and c <= goal for c in judged)
        worst = max((c for c in judged if c == c), default=float("nan"))
        hidden = worst == worst and all(abs(costs[label]) <= noise[label] for label in JUDGED)
        print(
            f"- {name} (goal <= {goal:g} %): "
            + ", ".join(f"{label} {costs[label]:+.1f} %" for label in JUDGED)
            + f" — {'met' if met else 'NOT met'}"
            + f"; CPU per conn {costs['CPU µs per conn']:+.1f} %, per Gbit (1 stream)"
            f" {costs['CPU s per Gbit (1 stream)']:+.1f} %"
            + "; web off's own rounds span "
            + (
                ", ".join(f"{label} {fmt(noise[label], 1)} %" for label in JUDGED)
                if args.rounds > 1
                else "n/a (one round)"
            )
            + (" (every cost is within that span: not told apart from noise)" if hidden else "")
        )
    if TWIN in setups:
        twin = {
            label: cost(medians[TWIN][label] / medians[OFF][label], higher) if medians[OFF][label] else 0.0
            for label, _, _, higher in METRICS
        }
        print(
            "- A/A control, web off (twin) against web off: "
            + ", ".join(f"{label} {twin[label]:+.1f} %" for label in JUDGED)
        )
    if args.write:
        print("\n(--write: nothing written; this benchmark only prints)")

    status = 0
    print()
    for name, setup in setups.items():
        if setup.watcher is None:
            continue
        unit = "status events" if setup.watcher == "curl" else "stream bytes"
        got = setup.seen
        print(
            f"{name}: the {setup.watcher} watcher got {unit} per measurement of {args.seconds} s: "
            + ", ".join(str(n) for n in got)
            + (f" (~{base.median(setup.sizes):,.0f} bytes an event)" if setup.watcher == "curl" else "")
        )
        if sum(got) <= 0:
            print(f"bench: the {setup.watcher} watcher of {name} got nothing: the stream did not flow")
            status = 1
        elif min(got) <= 0:
            print(
                f"note: the {setup.watcher} watcher of {name} got nothing during some measurement"
                " (a tick slower than the window?): that one measured no updating dashboard"
            )
    for name, setup in setups.items():
        lines = [line for line in logs.get(name, "").splitlines() if line.strip()]
        code = setup.forwarder.procs[0].popen.returncode
        print(
            f"{name}: stopped in {setup.stopped_in:.2f} s, exit {code}"
            + (f", EXITED EARLY ({early[name]})" if name in early else "")
            + (f"; stderr ({len(lines)} lines):" if lines else "; stderr empty")
        )
        for line in lines[:20]:
            print(f"    {line}")
        if name in early:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
