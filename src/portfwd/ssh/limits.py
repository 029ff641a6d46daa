"""The tunnel server's limits before and after authentication, as OpenSSH's sshd has them.

Pure bookkeeping, no I/O, so that each rule is tested on its own:

- `Startups`: sshd's `MaxStartups start:rate:full`. Up to `start` unauthenticated connections
  are all admitted; from `start` on, a new one is dropped with probability `rate` %, rising
  linearly to 100 % at `full`. A flood of idle connections therefore cannot take every slot
  while a real user still gets in with good odds.
- `Channels`: open channels per connection and per user. sshd's `MaxSessions` caps sessions
  per connection; a tunnel server's sessions are channels, so both the connection and the
  user (all of their connections together) get a cap, and one user cannot starve another of
  descriptors.
"""

from __future__ import annotations

import random
import time
from collections import Counter

from portfwd.tunnelspec import StartupsSpec


class Startups:
    """Counts unauthenticated connections and decides which new ones to drop."""

    def __init__(self, spec: StartupsSpec, chance: random.Random | None = None) -> None:
        self.spec = spec
        self.pending = 0
        self._chance = chance or random.Random()

    def admit(self) -> bool:
        """A connection arrived: True to keep it (then counted until `done`), False to drop it."""
        spec, pending = self.spec, self.pending
        if pending >= spec.full:
            return False
        if pending >= spec.start:
            span = max(1, spec.full - spec.start)
            drop = spec.rate + (100 - spec.rate) * (pending - spec.start) / span
            if self._chance.random() * 100 < drop:
                return False
        self.pending += 1
        return True

    def done(self) -> None:
        """An admitted connection authenticated or went away."""
        self.pending = max(0, self.pending - 1)


class Channels:
    """Open channels per connection (by id) and per user."""

    def __init__(self, per_connection: int, per_user: int) -> None:
        self.per_connection = per_connection
        self.per_user = per_user
        self._connections: Counter[int] = Counter()
        self._users: Counter[str] = Counter()

    def refusal(self, connection: int, user: str) -> str | None:
        """Why one more channel may not open now, or None (then call `opened`)."""
        if self._connections[connection] >= self.per_connection:
            return f"too many channels on this connection (max_channels = {self.per_connection})"
        if self._users[user] >= self.per_user:
            return f"too many channels for user {user} (max_channels_per_user = {self.per_user})"
        return None

    def opened(self, connection: int, user: str) -> None:
        self._connections[connection] += 1
        self._users[user] += 1

    def closed(self, connection: int, user: str) -> None:
        self._connections[connection] -= 1
        if self._connections[connection] <= 0:
            del self._connections[connection]
        self._users[user] -= 1
        if self._users[user] <= 0:
            del self._users[user]

    def open_for(self, user: str) -> int:
        return self._users[user]


class Failures:
    """Failed attempts per source address in a sliding window: `blocked` once `limit` are reached.

    The server's `max_auth_failures` (per address, per minute) and the SOCKS5 password lockout
    both keep their memory here. Sources are forgotten when their window has passed, so the
    table stays as small as the set of addresses failing right now.
    """

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self.limit = limit
        self.window = window
        self._seen: dict[str, list[float]] = {}

    def _recent(self, source: str, now: float) -> list[float]:
        recent = [stamp for stamp in self._seen.get(source, ()) if now - stamp < self.window]
        if recent:
            self._seen[source] = recent
        else:
            self._seen.pop(source, None)
        return recent

    def blocked(self, source: str) -> bool:
        return len(self._recent(source, time.monotonic())) >= self.limit

    def note(self, source: str) -> None:
        now = time.monotonic()
        self._seen[source] = [*self._recent(source, now), now]
