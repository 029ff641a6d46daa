"""Prometheus metrics: a collector that reads `state.State` at scrape time, and its HTTP endpoint.

Nothing on the relay hot path touches prometheus-client: relays add to plain integers in the
state, and this collector turns them into samples only when Prometheus asks.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from portfwd.errors import BindError
from portfwd.state import CONNECT_BUCKETS, State


class StateCollector(Collector):
    """Exports per-rule counters from the runtime's state."""

    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        """Build the samples from one consistent-enough snapshot of the state."""
        rules = list(self.state.rules.values())
        live_up: dict[str, int] = {}
        live_down: dict[str, int] = {}
        for session in list(self.state.sessions.values()):
            name = session.rule.name
            live_up[name] = live_up.get(name, 0) + session.bytes_up
            live_down[name] = live_down.get(name, 0) + session.bytes_down
        total = CounterMetricFamily(
            "portfwd_connections",
            "Connections (TCP) and flows (UDP) accepted per rule",
            labels=["rule"],
        )
        active = GaugeMetricFamily("portfwd_connections_active", "Live sessions per rule", labels=["rule"])
        data = CounterMetricFamily(
            "portfwd_bytes", "Bytes relayed; up is client to target", labels=["rule", "direction"]
        )
        errors = CounterMetricFamily(
            "portfwd_errors", "Failed or refused sessions by reason", labels=["rule", "reason"]
        )
        flows = GaugeMetricFamily("portfwd_udp_flows_active", "Live UDP flows per rule", labels=["rule"])
        connect = HistogramMetricFamily(
            "portfwd_upstream_connect_seconds", "Time to connect to the target", labels=["rule"]
        )
        for rule in rules:
            total.add_metric([rule.name], rule.connections_total)
            active.add_metric([rule.name], rule.connections_active)
            data.add_metric([rule.name, "up"], rule.bytes_up + live_up.get(rule.name, 0))
            data.add_metric([rule.name, "down"], rule.bytes_down + live_down.get(rule.name, 0))
            if rule.denied_total:
                errors.add_metric([rule.name, "denied"], rule.denied_total)
            for reason, count in list(rule.errors.items()):
                errors.add_metric([rule.name, reason], count)
            flows.add_metric([rule.name], rule.udp_flows_active)
            counts = list(rule.connect_buckets)
            cumulative = 0
            buckets = []
            for bound, count in zip((*map(str, CONNECT_BUCKETS), "+Inf"), counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            connect.add_metric([rule.name], buckets, sum_value=rule.connect_seconds_sum)
        yield from (total, active, data, errors, flows, connect)


class MetricsServer:
    """The /metrics HTTP endpoint, served from a daemon thread by prometheus-client."""

    def __init__(self, state: State, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(StateCollector(state))
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve. Raises BindError when the address cannot be bound."""
        try:
            self._server, self._thread = start_http_server(self.port, self.host, self.registry)
        except OSError as exc:
            raise BindError(
                f"cannot listen on {self.host}:{self.port}: {(exc.strerror or str(exc)).lower()}",
                field="metrics.listen",
                hint="pick another port in [metrics] listen",
            ) from exc

    @property
    def url(self) -> str:
        """Where to scrape."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown()
                self._server.server_close()
            self._server = None
