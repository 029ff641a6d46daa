"""The backend pool (relay/balance.py): its choices and its health counting, without sockets."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from portfwd.addr import HostPorts, PortRange
from portfwd.counters import BackendStats
from portfwd.relay.balance import Backend, Pool
from portfwd.specs import BackendSpec, Balance, HealthSpec


def _pool(
    weights: list[int],
    balance: Balance = "round-robin",
    backups: tuple[int, ...] = (),
    health: HealthSpec | None = None,
) -> tuple[Pool, list[tuple[Backend, bool, str]]]:
    specs = tuple(
        BackendSpec(HostPorts("10.0.0.1", PortRange(8000 + i, 8000 + i)), f"b{i}", weight, i in backups)
        for i, weight in enumerate(weights)
    )
    changes: list[tuple[Backend, bool, str]] = []
    stats = [BackendStats(spec.name, str(spec.connect), spec.weight, spec.backup) for spec in specs]
    pool = Pool(
        specs,
        balance,
        health or HealthSpec(),
        stats,
        lambda backend, up, why: changes.append((backend, up, why)),
    )
    return pool, changes


def _names(pool: Pool, count: int, source: str | None = None) -> list[str]:
    picked = []
    for _ in range(count):
        backend = pool.pick(source, 0.0)
        assert backend is not None
        picked.append(backend.spec.name)
    return picked


@given(st.lists(st.integers(1, 20), min_size=1, max_size=6))
def test_round_robin_gives_each_backend_its_weight_in_every_cycle(weights: list[int]) -> None:
    pool, _ = _pool(weights)
    cycle = _names(pool, sum(weights))
    assert Counter(cycle) == {f"b{i}": weight for i, weight in enumerate(weights)}


def test_smooth_round_robin_interleaves() -> None:
    pool, _ = _pool([5, 1, 1])
    assert _names(pool, 7) == ["b0", "b0", "b1", "b0", "b2", "b0", "b0"]  # nginx's example


def test_least_connections_counts_live_sessions_per_weight() -> None:
    pool, _ = _pool([1, 2], "least-connections")
    pool.backends[0].stats.active = 1
    pool.backends[1].stats.active = 2  # 2/1 = (1+1)/1 against (2+1)/2
    assert pool.pick(None, 0.0) is pool.backends[1]
    pool.backends[1].stats.active = 4
    assert pool.pick(None, 0.0) is pool.backends[0]


@given(st.lists(st.ip_addresses(v=4).map(str), min_size=1, max_size=30), st.integers(2, 5))
def test_source_hash_is_stable_and_moves_only_the_clients_of_a_lost_backend(
    sources: list[str], count: int
) -> None:
    pool, _ = _pool([1] * count, "source-hash")
    before = {source: pool.pick(source, 0.0) for source in sources}
    assert before == {source: pool.pick(source, 0.0) for source in sources}
    lost = pool.backends[0]
    lost.checked_up = False
    pool.refresh()
    for source, backend in before.items():
        after = pool.pick(source, 0.0)
        assert after is not lost
        if backend is not lost:
            assert after is backend


@given(
    st.lists(st.integers(1, 5), min_size=1, max_size=5),
    st.sampled_from(["round-robin", "least-connections", "source-hash", "first"]),
    st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_every_backend_is_tried_once_then_none(weights: list[int], balance: Balance, up: list[bool]) -> None:
    pool, _ = _pool(weights, balance)
    for backend, healthy in zip(pool.backends, up, strict=False):
        backend.checked_up = healthy
    pool.refresh()
    tried: tuple[Backend, ...] = ()
    for _ in weights:
        backend = pool.pick("10.1.2.3", 0.0, tried)
        assert backend is not None
        assert backend not in tried
        tried += (backend,)
    assert pool.pick("10.1.2.3", 0.0, tried) is None
    usable = [backend for backend in pool.backends if backend.checked_up]
    assert set(tried[: len(usable)]) == set(usable)  # the usable ones first


def test_backups_serve_only_while_no_other_backend_is_up() -> None:
    pool, _ = _pool([1, 1, 1], backups=(2,))
    assert set(_names(pool, 10)) == {"b0", "b1"}
    pool.backends[0].checked_up = pool.backends[1].checked_up = False
    pool.refresh()
    assert set(_names(pool, 4)) == {"b2"}


def test_passive_health_takes_a_backend_down_for_a_while_and_one_success_brings_it_back() -> None:
    pool, changes = _pool([1, 1], "first", health=HealthSpec(passive_fall=2, passive_down=10.0))
    first = pool.backends[0]
    pool.failed(first, 100.0, "connection refused")
    assert first.stats.up
    assert pool.pick(None, 100.0) is first
    pool.failed(first, 100.5, "connection refused")
    assert not first.stats.up
    assert first.stats.failures == 2
    assert "2 connects failed in a row (last: connection refused)" in first.stats.why
    assert pool.pick(None, 105.0) is pool.backends[1]
    assert pool.pick(None, 110.6) is first  # the window is over: tried again
    pool.connected(first)
    assert first.stats.up
    assert [up for _, up, _ in changes] == [False, True]


def test_active_checks_count_rise_and_fall_in_a_row() -> None:
    pool, changes = _pool([1, 1], health=HealthSpec(interval=1.0, rise=2, fall=3))
    backend = pool.backends[0]
    for ok in (False, False, True, False, False):  # never three in a row
        pool.checked(backend, ok, "x")
    assert backend.stats.up
    pool.checked(backend, False, "timeout after 1s")
    assert not backend.stats.up
    assert backend.stats.why == "3 checks failed (last: timeout after 1s)"
    pool.checked(backend, True, "ok")
    assert not backend.stats.up
    pool.checked(backend, True, "ok in 0.3 ms")
    assert backend.stats.up
    assert backend.stats.last_check_result == "ok in 0.3 ms"
    assert [up for _, up, _ in changes] == [False, True]


def test_one_backend_is_never_taken_down_passively() -> None:
    pool, changes = _pool([1], health=HealthSpec(passive_fall=1))
    pool.failed(pool.backends[0], 0.0, "refused")
    assert pool.backends[0].stats.up
    assert not changes


def test_a_pass_in_the_main_process_ends_a_passive_down_in_a_worker_too() -> None:
    """The main process tells the workers when a check passes that ends its own passive down;
    a worker taking that verdict (`impose`) ends its own, which its own connects had set; a
    verdict of down is kept until an up comes."""
    health = HealthSpec(interval=1.0, passive_fall=1, passive_down=60.0)
    main, _ = _pool([1, 1], health=health)
    told: list[tuple[int, bool]] = []
    main.verdict = lambda backend, up: told.append((backend.index, up))
    worker, changes = _pool([1, 1], health=health)
    for pool in (main, worker):
        pool.failed(pool.backends[0], 100.0, "connection refused")
        assert not pool.backends[0].stats.up
    main.checked(main.backends[0], True, "ok")
    assert main.backends[0].stats.up
    assert told == [(0, True)]
    for index, up in told:
        worker.impose(index, up)
    assert worker.backends[0].stats.up
    assert worker.pick(None, 101.0) is worker.backends[0]  # the window no longer holds it
    assert [(backend.index, up, why) for backend, up, why in changes][-1] == (
        0,
        True,
        "checked by the main process",
    )
    # A worker's own connects took a backend down that the main process sees up: the worker
    # reports it (once), and the main process's next pass ends it there too. A pass with no
    # report says nothing: the workers are not told of every check.
    told.clear()
    reports: list[int] = []
    worker.passive = lambda backend: reports.append(backend.index)
    main.checked(main.backends[1], True, "ok")
    assert told == []
    worker.failed(worker.backends[1], 200.0, "connection refused")
    worker.failed(worker.backends[1], 200.5, "connection refused")
    assert not worker.backends[1].stats.up
    assert reports == [1]
    for index in reports:
        main.reported(index)
    assert main.backends[1].stats.up
    main.checked(main.backends[1], True, "ok")
    main.checked(main.backends[1], True, "ok")
    assert told == [(1, True)], "once per report"
    worker.impose(1, True)
    assert worker.backends[1].stats.up
    worker.backends[0].failed_in_row = 1  # a failed connect, not yet a passive down...
    worker.impose(0, True)
    assert worker.backends[0].failed_in_row == 1, "...which a verdict on an up backend leaves alone"
    seen = len(changes)
    worker.impose(1, False)
    worker.impose(1, False)
    assert not worker.backends[1].stats.up
    assert [up for backend, up, _ in changes[seen:]] == [False]
