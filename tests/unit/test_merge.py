"""merge.py: the workers' rows folded into the main process's (one instance in status)."""

from __future__ import annotations

import dataclasses

from portfwd import merge
from portfwd.status import BackendRow, RuleRow


def _backend(state: str = "up", why: str = "", failures: int = 0, since: float = 1.0) -> BackendRow:
    return BackendRow("b1", "127.0.0.1:80", 1, False, state, since, why, 0, 3, 10, 20, failures, 0.0, "")


def _rule(backend: BackendRow) -> RuleRow:
    return RuleRow("r", "l", "c", "tcp", "splice", True, 1, 0, 2, 3, 0, {}, 0, backends=(backend,))


def test_a_workers_passive_down_shows_with_its_reason_counters_summed() -> None:
    main = _rule(_backend())
    worker = _rule(_backend("down", "1 connects failed in a row (last: connection refused)", 1, since=5.0))
    (row,) = merge.rules([main], [[worker]])
    (backend,) = row.backends
    assert (backend.state, backend.since) == ("down", 5.0)
    assert backend.why == "1 connects failed in a row (last: connection refused) (in a worker)"
    assert (backend.failures, backend.sessions_total, backend.bytes_up) == (1, 6, 20)


def test_the_main_processs_verdict_stands_when_it_says_down_or_the_workers_say_up() -> None:
    checked = _rule(_backend("down", "3 checks failed (last: refused)"))
    (row,) = merge.rules([checked], [[_rule(_backend("down", "other"))], [_rule(_backend())]])
    assert (row.backends[0].state, row.backends[0].why) == ("down", "3 checks failed (last: refused)")
    (row,) = merge.rules([_rule(_backend())], [[_rule(_backend())]])
    assert row.backends[0].state == "up"
    assert dataclasses.replace(row.backends[0], sessions_total=3, bytes_up=10, bytes_down=20) == _backend()
