"""Plan, then run: turn a validated `Config` into the frozen specs the engine runs (`specs.Plan`).

This is the one seam between the config file's pydantic models and the engine; nothing below
it imports `portfwd.config` (an import-linter contract says so). What validation proved is
written into the types here: single-port listeners become `Address`, a tunnel's destination is
split into user, host and port, a forward with `map = true` becomes a `MapSpec`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

from portfwd import config as config_module
from portfwd.addr import HostPorts
from portfwd.config import (
    MIN_TOKEN,
    Config,
    ForwardConfig,
    GatewayConfig,
    RouteConfig,
    ServerConfig,
    TunnelConfig,
    WebConfig,
)
from portfwd.errors import ConfigError
from portfwd.specs import (
    Address,
    BackendSpec,
    ControlSpec,
    GatewayForwardSpec,
    GatewayHASpec,
    GatewaySpec,
    GatewayTriggerSpec,
    HealthSpec,
    MapSpec,
    Plan,
    RouteSpec,
    RuleSpec,
    ServerSpec,
    ServerUserSpec,
    TunnelSpec,
    WebSpec,
)
from portfwd.tunnelspec import parse_destination


def plan(config: Config) -> Plan:
    """The specs of everything `config` asks for, in config order.

    Raises ConfigError for a `relay = "kernel"` rule the kernel cannot relay (the kernel layer
    says why), as for any other rule the config cannot have.
    """
    rules = tuple(rule_spec(index, rule) for index, rule in enumerate(config.forward))
    kernel = [rule for rule in rules if rule.relay == "kernel"]
    if kernel:
        from portfwd.kernel.relay import unsuitable

        problems = [
            f'{why}; remove relay = "kernel" or that setting' for rule in kernel if (why := unsuitable(rule))
        ]
        if problems:
            raise ConfigError(problems[0], problems=problems)
    metrics = _address(config.metrics.listen) if config.metrics is not None else None
    web = web_spec(config.web, metrics) if config.web is not None else None
    if web is not None and web.metrics:
        metrics = None  # one listener: the web server serves /metrics too
    return Plan(
        rules=rules,
        tunnels=tuple(tunnel_spec(tunnel) for tunnel in config.tunnel),
        server=server_spec(config.server) if config.server is not None else None,
        gateway=gateway_spec(config.gateway) if config.gateway is not None else None,
        maps=tuple(map_specs(config)),
        metrics=metrics,
        web=web,
        control=ControlSpec(config.control.enabled, config.control.socket, config.control.group),
        user=config.user,
        group=config.group,
        drain_timeout=config.drain_timeout,
        ssh_fast_path=config.ssh_fast_path,
        workers=workers(config.workers),
    )


def web_spec(web: WebConfig, metrics: Address | None) -> WebSpec:
    """`[web]` as the engine runs it: the token read from `token_file` now (a reload reads it
    again). Raises ConfigError naming web.token_file when it cannot be read, is empty, too
    short, or readable by other users (a token anyone on the host can read guards nothing)."""
    token = web.token.strip() if web.token is not None else None
    if web.token_file is not None:
        token = _token_file(Path(web.token_file).expanduser())
    listen = _address(web.listen)
    hosts = frozenset(name.lower().rstrip(".") for name in web.hosts)
    return WebSpec(listen=listen, token=token, auth=web.auth, metrics=listen == metrics, hosts=hosts)


def _token_file(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"web.token_file: cannot read {path}: {(exc.strerror or str(exc)).lower()}",
            hint="create it with `openssl rand -hex 16 > FILE; chmod 600 FILE`",
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"web.token_file: {path} is not text; put the token in it as one line") from exc
    if mode & 0o077:
        raise ConfigError(
            f"web.token_file: {path} is readable by other users (mode {mode & 0o777:04o}); chmod 600 it"
        )
    if len(text) < MIN_TOKEN or any(char.isspace() for char in text):
        raise ConfigError(
            f"web.token_file: {path} must hold one token of at least {MIN_TOKEN} characters and no spaces; "
            "write one with `openssl rand -hex 16`"
        )
    return text


def workers(wanted: int | str) -> int:
    """`workers = "auto"`: one per core on Linux (processes share listeners there), else one."""
    if isinstance(wanted, int):
        return wanted
    if sys.platform != "linux":
        return 1
    return max(1, min(64, len(os.sched_getaffinity(0))))  # the cores it may use, not the host's


def load(path: Path) -> Plan:
    """Read, validate and plan a config file. Raises ConfigError (a bad file plans nothing)."""
    return plan(config_module.load(path))


def _address(listen: object) -> Address:
    # config's cross-field checks refuse anything but one host:port for these listeners.
    assert isinstance(listen, HostPorts), listen
    assert len(listen.ports) == 1, listen
    return Address(listen.host, listen.ports.first)


def _backends(rule: ForwardConfig) -> tuple[BackendSpec, ...]:
    """Several targets as backends; one plain target as none (the rule's `connect`)."""
    targets = rule.targets
    if len(targets) == 1 and rule.health is None and targets[0].name is None:
        return ()
    names = [backend.name or str(backend.connect) for backend in targets]
    for index, name in enumerate(names):  # two unnamed backends of one target: told apart
        if name in names[:index]:
            names[index] = f"{name}#{index + 1}"
    return tuple(
        BackendSpec(connect=backend.connect, name=name, weight=backend.weight, backup=backend.backup)
        for backend, name in zip(targets, names, strict=True)
    )


def _health(rule: ForwardConfig) -> HealthSpec:
    health = rule.health
    if health is None:
        return HealthSpec()
    return HealthSpec(
        interval=health.interval if health.check == "tcp" else 0.0,
        timeout=health.timeout,
        rise=health.rise,
        fall=health.fall,
        send=health.send or b"",
        expect=health.expect or b"",
        passive_fall=health.passive_fall,
        passive_down=health.passive_down,
    )


def _route(rule: ForwardConfig, route: RouteConfig) -> RouteSpec:
    if route.connect is not None:
        return RouteSpec(route.source, route.connect)
    # config's checks proved the name is a backend's
    index = next(i for i, backend in enumerate(rule.backend) if backend.name == route.backend)
    return RouteSpec(route.source, rule.backend[index].connect, backend=index)


def rule_spec(index: int, rule: ForwardConfig) -> RuleSpec:
    """One `[[forward]]` as the relay layer's spec."""
    return RuleSpec(
        label=rule.label,
        name=rule.name,
        listen=rule.listen,
        connect=rule.targets[0].connect,
        protocol=rule.protocol,
        allow=rule.allow,
        deny=rule.deny,
        route=tuple(_route(rule, route) for route in rule.route),
        udp_idle_timeout=rule.udp_idle_timeout,
        udp_max_flows=rule.udp_max_flows,
        connect_timeout=rule.connect_timeout,
        relay=rule.relay,
        dual_stack=rule.dual_stack,
        backlog=rule.backlog,
        reuseport=rule.reuseport,
        tcp_keepalive=rule.tcp_keepalive,
        idle_timeout=rule.idle_timeout,
        proxy_protocol={"v1": 1, "v2": 2}.get(rule.proxy_protocol or "", 0),
        accept_proxy=rule.accept_proxy_protocol,
        trusted_proxies=rule.trusted_proxies,
        max_connections=rule.max_connections or 0,
        max_connections_per_source=rule.max_connections_per_source or 0,
        rate=rule.rate,
        backends=_backends(rule),
        balance=rule.balance,
        health=_health(rule),
        bandwidth=rule.bandwidth or 0.0,
        bandwidth_per_connection=rule.bandwidth_per_connection or 0.0,
        transparent=rule.transparent,
        where=f"forward[{index}]" + (f" ({rule.name})" if rule.name else ""),
    )


def tunnel_spec(tunnel: TunnelConfig) -> TunnelSpec:
    """One `[[tunnel]]` as the SSH layer's spec; `user`/`port` keys win over the destination's."""
    user, host, port = parse_destination(tunnel.ssh)
    strict: Literal["yes", "accept-new"] = (
        "accept-new" if tunnel.strict_host_key_checking == "accept-new" else "yes"
    )
    credentials = None
    if tunnel.socks_user is not None and tunnel.socks_password is not None:
        credentials = (tunnel.socks_user, tunnel.socks_password)
    return TunnelSpec(
        label=tunnel.label,
        ssh=tunnel.ssh,
        user=tunnel.user or user,
        host=host,
        port=tunnel.port or port,
        identity=tunnel.identity,
        agent=tunnel.agent,
        identities_only=tunnel.identities_only,
        known_hosts=tunnel.known_hosts,
        global_known_hosts=tunnel.global_known_hosts,
        hash_known_hosts=tunnel.hash_known_hosts,
        strict_host_key_checking=strict,
        jump=tunnel.jump,
        ssh_config=tunnel.ssh_config,
        local=tunnel.local,
        remote=tunnel.remote,
        dynamic=tunnel.dynamic,
        keepalive_interval=tunnel.keepalive_interval,
        keepalive_count=tunnel.keepalive_count,
        connect_timeout=tunnel.connect_timeout,
        reconnect_min=tunnel.reconnect_min,
        reconnect_max=tunnel.reconnect_max,
        reconnect_attempts=tunnel.reconnect_attempts,
        exit_on_forward_failure=tunnel.exit_on_forward_failure,
        compression=tunnel.compression,
        kex=tunnel.kex,
        ciphers=tunnel.ciphers,
        macs=tunnel.macs,
        host_key_algorithms=tunnel.host_key_algorithms,
        socks_credentials=credentials,
        tcp_keepalive=tunnel.tcp_keepalive,
        idle_timeout=tunnel.idle_timeout,
        retry_first_connect=tunnel.retry_first_connect,
    )


def server_spec(server: ServerConfig) -> ServerSpec:
    """`[server]` as the SSH layer's spec."""
    return ServerSpec(
        listen=_address(server.listen),
        host_key=server.host_key,
        users=tuple(
            ServerUserSpec(user.name, user.authorized_keys, user.permit_open, user.permit_listen, user.source)
            for user in server.user
        ),
        gateway_ports=server.gateway_ports,
        client_alive_interval=server.client_alive_interval,
        client_alive_count=server.client_alive_count,
        max_auth_failures=server.max_auth_failures,
        login_grace_time=server.login_grace_time,
        max_startups=server.max_startups,
        max_auth_tries=server.max_auth_tries,
        max_channels=server.max_channels,
        max_channels_per_user=server.max_channels_per_user,
        takeover_probe=server.takeover_probe,
        kex=server.kex,
        ciphers=server.ciphers,
        macs=server.macs,
        host_key_algorithms=server.host_key_algorithms,
        tcp_keepalive=server.tcp_keepalive,
        idle_timeout=server.idle_timeout,
    )


def gateway_spec(gateway: GatewayConfig) -> GatewaySpec:
    """`[gateway]` as the kernel layer's spec."""
    return GatewaySpec(
        wan=gateway.wan,
        lan=gateway.lan,
        masquerade=gateway.masquerade,
        hairpin=gateway.hairpin,
        allow_external_target=gateway.allow_external_target,
        enable_forwarding=gateway.enable_forwarding,
        ipv6_firewall=(
            gateway.ipv6_firewall
            if gateway.ipv6_firewall is not None
            else gateway.enable_forwarding or any(":" in rule.to.host for rule in gateway.forward)
        ),
        open_other_tables=gateway.open_other_tables,
        flowtable=gateway.flowtable,
        ha=(
            GatewayHASpec(
                gateway.ha.peer,
                gateway.ha.virtual_addresses,
                gateway.ha.sync_interface,
                gateway.ha.priority,
                gateway.ha.router_id,
                gateway.ha.advert_interval,
            )
            if gateway.ha is not None
            else None
        ),
        forward=tuple(
            GatewayForwardSpec(rule.label, rule.name, rule.port, rule.to, rule.protocol, rule.allow)
            for rule in gateway.forward
        ),
        trigger=tuple(
            GatewayTriggerSpec(item.name, item.trigger, item.open, item.idle_timeout, item.mode)
            for item in gateway.trigger
        ),
    )


def map_specs(config: Config) -> list[MapSpec]:
    """Every router mapping: `[[map]]` plus each single-port `[[forward]]` with `map = true`, per protocol."""
    maps = [
        MapSpec(
            f"map[{index}]",
            entry.protocol,
            entry.port,
            entry.external,
            max(1, round(entry.lease)),
            entry.method,
            entry.upnp_url,
            entry.gateway,
        )
        for index, entry in enumerate(config.map)
    ]
    for field, entry in config_module.published(config)[len(config.map) :]:
        maps.append(MapSpec(field, entry.protocol, entry.port, entry.external, max(1, round(entry.lease))))
    return maps
