"""Choosing a backend for each new client: balancing, failover, and health as the pool sees it.

Sans-IO: the pool is told what happened (a connect failed or worked, a check passed or failed,
with the monotonic time) and answers which backend to try; the forwarders connect and the
health checker probes (relay/health.py). One pool per rule, shared by its listening ports and
its UDP forwarders, so balancing and health are the rule's, not a port's.

Methods, as haproxy and nginx name them:
- `round-robin`: smooth weighted round-robin (nginx's): weights spread evenly, not in bursts.
- `least-connections`: fewest live sessions per unit of weight; ties go round the list.
- `source-hash`: rendezvous (highest-random-weight) hashing of the client address, weighted,
  so a client stays on one backend and only the clients of a backend that goes down move.
  The hash is blake2b, not `hash()`: the same client maps the same way in every process
  (workers) and after a restart.
- `first`: the first usable backend in the order written (failover).

A backup backend is chosen only while no other is usable. A backend is usable while its active
checks pass (haproxy's rise/fall) and it is not passively down (`passive_fall` failed connects
in a row take it down for `passive_down` seconds; then the next client may try it again, and
one success brings it back). When nothing is usable the clients still try every backend,
least recently failed first: a check can be wrong, and a client refused at once is worse than
one that waits for a connect that may work.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable

from portfwd.counters import BackendStats
from portfwd.specs import BackendSpec, Balance, HealthSpec

#: Called with (backend, up, why) when a backend goes down or comes back up.
Changed = Callable[["Backend", bool, str], None]


class Backend:
    """One backend's place in the pool: its spec, stats and health counters."""

    __slots__ = (
        "checked_up",
        "checks_failed",
        "checks_passed",
        "current",
        "elsewhere",
        "failed_in_row",
        "index",
        "key",
        "passive_until",
        "spec",
        "stats",
    )

    def __init__(self, index: int, spec: BackendSpec, stats: BackendStats) -> None:
        self.index = index
        self.spec = spec
        self.stats = stats
        self.key = spec.name.encode()  # source-hash mixes it with the client address
        self.current = 0  # smooth weighted round-robin's running weight
        self.failed_in_row = 0  # connects (passive)
        self.passive_until = 0.0  # monotonic; down passively until then
        self.checked_up = True  # the active checks' verdict
        self.checks_passed = 0  # in a row
        self.checks_failed = 0
        #: A worker said its own connects took it down passively (the main process's pool).
        self.elsewhere = False

    def usable(self, now: float) -> bool:
        return self.checked_up and self.passive_until <= now


class Pool:
    """A rule's backends and how a client is given one."""

    def __init__(
        self,
        backends: tuple[BackendSpec, ...],
        balance: Balance,
        health: HealthSpec,
        stats: list[BackendStats],
        changed: Changed | None = None,
    ) -> None:
        self.backends = [
            Backend(index, spec, item) for index, (spec, item) in enumerate(zip(backends, stats, strict=True))
        ]
        self.primaries = [backend for backend in self.backends if not backend.spec.backup]
        self.backups = [backend for backend in self.backends if backend.spec.backup]
        self.balance = balance
        self.health = health
        self.changed = changed
        #: Told each time the active checks' verdict on a backend flips, and when a pass ends a
        #: passive down, here or in a worker that reported one (the workers follow: `impose`).
        self.verdict: Callable[[Backend, bool], None] | None = None
        #: A worker's pool: told when its own connects take a backend down passively (the main
        #: process marks it `elsewhere`, so that its next pass reaches the workers).
        self.passive: Callable[[Backend], None] | None = None
        self._turn = 0  # where least-connections' tie-break starts
        #: `_healthy` as one byte the C engine reads for each client (relay/_native.c): while
        #: it is 1, round-robin and first are picked there, as `_choose` would.
        self.flag = bytearray(b"\x01")
        self._healthy = True

    @property
    def _healthy(self) -> bool:
        """No backend is down or was down passively: picks skip the filtering."""
        return bool(self.flag[0])

    @_healthy.setter
    def _healthy(self, value: bool) -> None:
        self.flag[0] = 1 if value else 0

    # ------------------------------------------------------------------ choosing
    def pick(
        self,
        source: str | None,
        now: float,
        tried: tuple[Backend, ...] = (),
        preferred: int | None = None,
    ) -> Backend | None:
        """The backend a client should try next, not one of `tried`; None once every backend
        was tried. `source` is the client's address (source-hash), `preferred` a route's backend."""
        if preferred is not None:
            backend = self.backends[preferred]
            if backend not in tried and backend.usable(now):
                return backend
        if self._healthy and not tried:  # the common case: no list to build
            return self._choose(self.primaries, source)
        for group in (self.primaries, self.backups):
            usable = [backend for backend in group if backend.usable(now) and backend not in tried]
            if usable:
                return self._choose(usable, source)
        rest = [backend for backend in self.backends if backend not in tried]
        if not rest:
            return None
        # Nothing is usable: try them all anyway, the one that failed longest ago first.
        return min(rest, key=lambda backend: (backend.passive_until, backend.index))

    def _choose(self, usable: list[Backend], source: str | None) -> Backend:
        if len(usable) == 1:
            return usable[0]
        balance = self.balance
        if balance == "first":
            return usable[0]
        if balance == "source-hash" and source is not None:
            return max(usable, key=lambda backend: _score(source, backend))
        if balance == "least-connections":
            count = len(usable)
            start = self._turn % count
            self._turn += 1
            ordered = usable[start:] + usable[:start]
            return min(ordered, key=lambda backend: (backend.stats.active + 1) / backend.spec.weight)
        # round-robin (and source-hash for a client with no address: a Unix socket's)
        total = 0
        best = usable[0]
        for backend in usable:
            backend.current += backend.spec.weight
            total += backend.spec.weight
            if backend.current > best.current:
                best = backend
        best.current -= total
        return best

    # ------------------------------------------------------------------ what happened
    def connected(self, backend: Backend) -> None:
        """A connect to `backend` worked: it is passively healthy again."""
        if backend.failed_in_row:
            backend.failed_in_row = 0
            if backend.passive_until:
                backend.passive_until = 0.0
                self.refresh()
                if backend.checked_up:
                    self._set(backend, True, "a connect worked")

    def failed(self, backend: Backend, now: float, why: str) -> None:
        """A connect to `backend` failed (`why`: its error): passive health."""
        backend.stats.failures += 1
        backend.failed_in_row += 1
        fall = self.health.passive_fall
        if fall and backend.failed_in_row >= fall and len(self.backends) > 1:
            backend.passive_until = now + self.health.passive_down
            self._healthy = False
            if backend.stats.up:
                self._set(
                    backend,
                    False,
                    f"{backend.failed_in_row} connects failed in a row (last: {why}); "
                    f"retried after {self.health.passive_down:g}s",
                )
                if self.passive is not None:
                    self.passive(backend)

    def checked(self, backend: Backend, ok: bool, result: str) -> None:
        """An active check ended: `rise` passes in a row bring a backend up, `fall` failures
        take it down."""
        backend.stats.last_check = time.time()
        backend.stats.last_check_result = result
        if ok:
            backend.checks_failed = 0
            backend.checks_passed += 1
            if backend.checked_up and backend.passive_until:  # passively down: a pass ends it
                backend.passive_until = 0.0
                backend.failed_in_row = 0
                backend.elsewhere = False
                self.refresh()
                if self.verdict is not None:  # in the workers too (`impose`)
                    self.verdict(backend, True)
                self._set(backend, True, "a check passed")
            elif not backend.checked_up and backend.checks_passed >= self.health.rise:
                backend.checked_up = True
                backend.passive_until = 0.0
                backend.failed_in_row = 0
                self.refresh()
                if self.verdict is not None:
                    self.verdict(backend, True)
                self._set(backend, True, f"{backend.checks_passed} checks passed")
            elif backend.checked_up and backend.elsewhere:  # a worker's passive down: ends there
                backend.elsewhere = False
                if self.verdict is not None:
                    self.verdict(backend, True)
        else:
            backend.checks_passed = 0
            backend.checks_failed += 1
            if backend.checked_up and backend.checks_failed >= self.health.fall:
                backend.checked_up = False
                self._healthy = False
                if self.verdict is not None:
                    self.verdict(backend, False)
                self._set(backend, False, f"{backend.checks_failed} checks failed (last: {result})")

    def refresh(self) -> None:
        """Re-read whether every backend is healthy (after a change of `checked_up` or
        `passive_until`; the pool makes its own, a test may make one by hand)."""
        self._healthy = all(item.checked_up and not item.passive_until for item in self.backends)

    def reported(self, index: int) -> None:
        """A worker's connects took backend `index` down passively there (`passive`)."""
        self.backends[index].elsewhere = True

    def impose(self, index: int, up: bool) -> None:
        """Take the main process's verdict on backend `index` (a worker follows the main
        process's checks instead of making its own). Up: a check passed there, which ends a
        passive down here too, as it does there (`checked`), whatever this process's own
        connects had seen."""
        backend = self.backends[index]
        if up:
            changed = not backend.checked_up or bool(backend.passive_until)
            backend.checked_up = True
            if changed:
                backend.passive_until = 0.0
                backend.failed_in_row = 0
                self.refresh()
                self._set(backend, True, "checked by the main process")
            return
        if not backend.checked_up:
            return
        backend.checked_up = False
        self.refresh()
        self._set(backend, False, "checked by the main process")

    def _set(self, backend: Backend, up: bool, why: str) -> None:
        stats = backend.stats
        if stats.up == up:
            return
        stats.up = up
        stats.since = time.time()
        stats.why = "" if up else why
        if self.changed is not None:
            self.changed(backend, up, why)


def _score(source: str, backend: Backend) -> float:
    """Weighted rendezvous hashing: -weight / ln(h), h uniform in (0, 1) from the pair's hash."""
    digest = hashlib.blake2b(source.encode() + b"\0" + backend.key, digest_size=8).digest()
    uniform = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)
    return -backend.spec.weight / math.log(uniform)
