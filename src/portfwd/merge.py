"""One instance's picture from several processes: the workers' status rows folded into the main's.

With `workers = N` the rules are relayed by N processes; `status`, `/metrics` and the control
socket show one instance. Each worker answers with a snapshot of its own (services/workers.py),
and these functions fold them into the main process's rows: a rule's counters are summed, its
backends' too; a backend's health is the main process's (its checks rule every process), or
down while a worker's own connects hold it down passively (that worker sends it no one, as
haproxy's one shared server state would say). Live and recently closed sessions are listed
together (each names its process), newest first per rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from portfwd.status import BackendRow, ClosedRow, RuleRow

#: RuleRow fields that are counts or rates: summed over the processes.
_SUMMED = (
    "connections_total",
    "connections_active",
    "bytes_up",
    "bytes_down",
    "denied_total",
    "udp_flows_active",
    "connect_seconds_sum",
    "rate_up",
    "rate_down",
)
_BACKEND_SUMMED = ("sessions_active", "sessions_total", "bytes_up", "bytes_down", "failures")


def rules(own: Sequence[RuleRow], peers: Iterable[Sequence[RuleRow]]) -> list[RuleRow]:
    """The main process's rule rows with every worker's counters added to the rule of the same name."""
    merged = {row.name: row for row in own}
    for rows in peers:
        for row in rows:
            mine = merged.get(row.name)
            if mine is None:  # a rule only a worker still serves (removed here, draining there)
                merged[row.name] = row
                continue
            merged[row.name] = _add(mine, row)
    return list(merged.values())


def _add(mine: RuleRow, other: RuleRow) -> RuleRow:
    changes: dict[str, object] = {name: getattr(mine, name) + getattr(other, name) for name in _SUMMED}
    errors = dict(mine.errors)
    for reason, count in other.errors.items():
        errors[reason] = errors.get(reason, 0) + count
    changes["errors"] = errors
    if len(mine.connect_buckets) == len(other.connect_buckets):
        changes["connect_buckets"] = tuple(
            a + b for a, b in zip(mine.connect_buckets, other.connect_buckets, strict=True)
        )
    theirs = {backend.name: backend for backend in other.backends}
    changes["backends"] = tuple(_add_backend(backend, theirs.get(backend.name)) for backend in mine.backends)
    return dataclasses.replace(mine, **changes)  # type: ignore[arg-type]


def _add_backend(mine: BackendRow, other: BackendRow | None) -> BackendRow:
    if other is None:
        return mine
    changes: dict[str, object] = {
        name: getattr(mine, name) + getattr(other, name) for name in _BACKEND_SUMMED
    }
    if other.state == "down" and mine.state == "up":  # that worker's connects: passive, there only
        changes.update(state="down", since=other.since, why=f"{other.why} (in a worker)")
    return dataclasses.replace(mine, **changes)  # type: ignore[arg-type]


def closed(rows: Iterable[ClosedRow], order: Sequence[str], keep: int) -> list[ClosedRow]:
    """Recently closed sessions of several processes: per rule in `order` (then the rest, in the
    order met), newest first, at most `keep` per rule."""
    groups: dict[str, list[ClosedRow]] = {name: [] for name in order}
    for row in rows:
        groups.setdefault(row.rule, []).append(row)
    out: list[ClosedRow] = []
    for group in groups.values():
        group.sort(key=lambda row: row.ended, reverse=True)
        out.extend(group[:keep])
    return out
