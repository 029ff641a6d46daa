"""portfwd with accounting switched off, for bench/accounting.py only: the same build, minus counting.

Removes, at start-up, the byte counting from the relay hot paths (the splice and Protocol
relays and the UDP flows), the per-session registry of the state, the idle sampler and the
metrics endpoint, then runs the normal CLI. Nothing here is imported by portfwd itself.
"""

from __future__ import annotations

import inspect
import textwrap
import time
from typing import Any

from portfwd import counters, state
from portfwd.relay import splice, tcp, udp
from portfwd.services import sampler

COUNTING = (
    "relay.session.bytes_up += moved",
    "relay.session.bytes_down += moved",
    "self.relay.session.bytes_up += len(data)",
    "self.relay.session.bytes_down += len(data)",
    "flow.session.bytes_up += len(datagram)",
    "self.session.bytes_down += len(datagram)",
    "self.session.bytes_up += len(datagram)",
)


def _without_counting(function: Any) -> Any:
    source = textwrap.dedent(inspect.getsource(function))
    stripped = source
    for line in COUNTING:
        stripped = stripped.replace(line, "pass")
    assert stripped != source or "bytes_" not in source, f"counting left in {function.__qualname__}"
    namespace: dict[str, Any] = {}
    exec(compile(stripped, inspect.getsourcefile(function) or "?", "exec"), function.__globals__, namespace)
    return namespace[function.__name__]


def _patch() -> None:
    for owner, name in (
        (splice._Direction, "on_readable"),
        (tcp._Side, "data_received"),
        (udp.UdpForwarder, "_on_datagram"),
        (udp._Flow, "send"),
        (udp._Flow, "on_reply"),
    ):
        setattr(owner, name, _without_counting(getattr(owner, name)))

    ids = iter(range(1, 1 << 62))

    def open_session(
        self: state.State, rule: counters.RuleStats, client: str, target: str, path: str
    ) -> counters.Session:
        now = time.monotonic()
        return counters.Session(next(ids), rule, client, target, path, now)

    def close_session(self: state.State, session: counters.Session, reason: str = "") -> None:
        return None

    state.State.open_session = open_session  # type: ignore[method-assign]
    state.State.close_session = close_session  # type: ignore[method-assign]
    counters.RuleStats.observe_connect = lambda self, seconds: None  # type: ignore[method-assign]
    sampler.Sampler.sample = lambda self: None  # type: ignore[method-assign]


if __name__ == "__main__":
    _patch()
    from portfwd.cli import main

    main()
