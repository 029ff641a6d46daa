"""Prometheus metrics: a collector over the state's typed status rows, and its HTTP endpoint.

Nothing on the relay hot path touches prometheus-client: relays add to plain integers in the
state, and this collector turns them into samples only when Prometheus asks.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from portfwd.counters import CONNECT_BUCKETS
from portfwd.errors import BindError
from portfwd.relay.listener import StreamListener
from portfwd.state import State
from portfwd.status import GatewayRuleRow, MappingRow, RuleRow, ServerSessionRow, TriggerRow, TunnelRow

REQUEST_TIMEOUT = 10.0
MAX_REQUEST = 16 * 1024


class StateCollector(Collector):
    """Exports the runtime's status rows (status.py, the types `portfwd status` shows) as samples."""

    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        """Build the samples from the state's typed status rows (one consistent-enough moment)."""
        yield from self._rules(self.state.rule_rows())
        yield from self._tunnels(self.state.tunnel_rows())
        yield from self._server(self.state.server_rows(), self.state.server_auth_failures)
        yield from self._gateway(list(self.state.gateway_rules), list(self.state.triggers))
        yield from self._mappings(list(self.state.mappings))

    @staticmethod
    def _rules(rules: list[RuleRow]) -> Iterator[Metric]:
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
            data.add_metric([rule.name, "up"], rule.bytes_up)
            data.add_metric([rule.name, "down"], rule.bytes_down)
            if rule.denied_total:
                errors.add_metric([rule.name, "denied"], rule.denied_total)
            for reason, count in rule.errors.items():
                errors.add_metric([rule.name, reason], count)
            flows.add_metric([rule.name], rule.udp_flows_active)
            cumulative = 0
            buckets = []
            for bound, count in zip((*map(str, CONNECT_BUCKETS), "+Inf"), rule.connect_buckets, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            connect.add_metric([rule.name], buckets, sum_value=rule.connect_seconds_sum)
        yield from (total, active, data, errors, flows, connect)
        yield from StateCollector._backends(rules)

    @staticmethod
    def _backends(rules: list[RuleRow]) -> Iterator[Metric]:
        labels = ["rule", "backend"]
        up = GaugeMetricFamily("portfwd_backend_up", "1 while the backend is up (its health)", labels=labels)
        active = GaugeMetricFamily(
            "portfwd_backend_sessions_active", "Live sessions per backend", labels=labels
        )
        total = CounterMetricFamily(
            "portfwd_backend_sessions", "Sessions given to each backend", labels=labels
        )
        data = CounterMetricFamily(
            "portfwd_backend_bytes",
            "Bytes relayed per backend; up is client to target",
            labels=[*labels, "direction"],
        )
        failures = CounterMetricFamily(
            "portfwd_backend_connect_failures", "Upstream connects to the backend that failed", labels=labels
        )
        checked = GaugeMetricFamily(
            "portfwd_backend_last_check_timestamp_seconds", "When the last active check ended", labels=labels
        )
        for rule in rules:
            for backend in rule.backends:
                names = [rule.name, backend.name]
                up.add_metric(names, 1 if backend.state == "up" else 0)
                active.add_metric(names, backend.sessions_active)
                total.add_metric(names, backend.sessions_total)
                data.add_metric([*names, "up"], backend.bytes_up)
                data.add_metric([*names, "down"], backend.bytes_down)
                failures.add_metric(names, backend.failures)
                if backend.last_check:
                    checked.add_metric(names, backend.last_check)
        yield from (up, active, total, data, failures, checked)

    @staticmethod
    def _tunnels(tunnels: list[TunnelRow]) -> Iterator[Metric]:
        up = GaugeMetricFamily("portfwd_tunnel_up", "1 while the SSH link is up", labels=["tunnel"])
        reconnects = CounterMetricFamily(
            "portfwd_tunnel_reconnects", "Times the SSH link came back after a loss", labels=["tunnel"]
        )
        sessions = CounterMetricFamily(
            "portfwd_tunnel_connections", "Sessions per tunnel forward", labels=["tunnel", "forward"]
        )
        active = GaugeMetricFamily(
            "portfwd_tunnel_connections_active",
            "Live sessions per tunnel forward",
            labels=["tunnel", "forward"],
        )
        data = CounterMetricFamily(
            "portfwd_tunnel_bytes",
            "Bytes through a tunnel forward; up is client to target",
            labels=["tunnel", "forward", "direction"],
        )
        for tunnel in tunnels:
            up.add_metric([tunnel.name], 1 if tunnel.state == "up" else 0)
            reconnects.add_metric([tunnel.name], tunnel.reconnects)
            for forward in tunnel.forwards:
                labels = [tunnel.name, forward.spec]
                sessions.add_metric(labels, forward.connections_total)
                active.add_metric(labels, forward.connections_active)
                data.add_metric([*labels, "up"], forward.bytes_up)
                data.add_metric([*labels, "down"], forward.bytes_down)
        yield from (up, reconnects, sessions, active, data)

    @staticmethod
    def _server(clients: list[ServerSessionRow], auth_failures: int) -> Iterator[Metric]:
        server_active = GaugeMetricFamily(
            "portfwd_server_sessions_active", "Clients logged in to portfwd server", labels=["user"]
        )
        users: dict[str, int] = {}
        for item in clients:
            users[item.user] = users.get(item.user, 0) + 1
        for user, count in sorted(users.items()):
            server_active.add_metric([user], count)
        failures = CounterMetricFamily(
            "portfwd_server_auth_failures", "Failed logins to portfwd server", value=auth_failures
        )
        yield from (server_active, failures)

    @staticmethod
    def _gateway(rules: list[GatewayRuleRow], triggers: list[TriggerRow]) -> Iterator[Metric]:
        packets = CounterMetricFamily(
            "portfwd_gateway_packets", "Packets matched by a gateway nftables rule", labels=["chain", "rule"]
        )
        octets = CounterMetricFamily(
            "portfwd_gateway_bytes", "Bytes matched by a gateway nftables rule", labels=["chain", "rule"]
        )
        for row in rules:
            packets.add_metric([row.chain, row.rule], row.packets)
            octets.add_metric([row.chain, row.rule], row.bytes)
        held = GaugeMetricFamily(
            "portfwd_trigger_held", "1 while a LAN host holds a port trigger", labels=["trigger", "host"]
        )
        for trigger in triggers:
            if trigger.host:
                held.add_metric([trigger.trigger, trigger.host], 1)
        yield from (packets, octets, held)

    @staticmethod
    def _mappings(mappings: list[MappingRow]) -> Iterator[Metric]:
        mapped = GaugeMetricFamily(
            "portfwd_mapping_up",
            "1 while the router holds a mapping portfwd asked for",
            labels=["mapping", "method"],
        )
        lease_left = GaugeMetricFamily(
            "portfwd_mapping_lease_seconds", "Seconds left on a router mapping's lease", labels=["mapping"]
        )
        renewals = CounterMetricFamily(
            "portfwd_mapping_renewals", "Renewals and checks of a router mapping", labels=["mapping"]
        )
        now = time.time()
        for row in mappings:
            name = f"{row.name} {row.protocol}"
            mapped.add_metric([name, row.method], 1 if row.state == "up" else 0)
            if row.expires:
                lease_left.add_metric([name], max(0.0, row.expires - now))
            renewals.add_metric([name], row.renewals)
        yield from (mapped, lease_left, renewals)


class MetricsServer:
    """The /metrics HTTP endpoint, served from the event loop itself.

    prometheus-client's own server runs in a thread, and merely having that thread beside the
    relay costs CPU on bulk transfers; a uvloop server object (`asyncio.start_server`) in the
    loop costs CPU on every relayed connection, even when never scraped (bench/RESULTS.md, D4
    and D5). So the
    listener is portfwd's own accept loop, the exposition text comes from prometheus-client
    (`generate_latest`), and the few lines of HTTP/1.0 around it are ours. A scrape sees a
    consistent state because nothing else runs meanwhile.
    """

    def __init__(self, state: State, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(StateCollector(state))
        self.state = state
        self.host = host
        self.port = port
        self._accepting: StreamListener | None = None

    async def start(self) -> None:
        """Bind and serve. Raises BindError when the address cannot be bound."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            listener = socket.create_server((self.host, self.port), family=family, backlog=64)
        except OSError as exc:
            raise BindError(
                f"cannot listen on {self.host}:{self.port}: {(exc.strerror or str(exc)).lower()}",
                field="metrics.listen",
                hint="pick another port in [metrics] listen",
            ) from exc
        listener.setblocking(False)
        self._accepting = StreamListener(listener, self._handle, "metrics", MAX_REQUEST)
        self._accepting.start()
        self.state.add_listening("metrics", "http", [listener], "metrics")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = (head.split(b"\r\n", 1)[0].decode("latin-1") + "  ").split(" ", 2)
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, body, kind = "405 Method Not Allowed", b"only GET\n", "text/plain"
            elif path in ("/metrics", "/"):
                await self.state.refresh()  # the workers' counters, with `workers`
                status, body, kind = "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
            else:
                status, body, kind = "404 Not Found", b"try /metrics\n", "text/plain"
            header = (
                f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(header if method == "HEAD" else header + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that sends no complete request gets nothing
        finally:
            writer.close()

    @property
    def url(self) -> str:
        """Where to scrape."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._accepting is not None:
            self.state.remove_listening(["metrics"], "metrics")
            self._accepting.close()
            self._accepting = None
