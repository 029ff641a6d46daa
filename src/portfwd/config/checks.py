"""Validation: pydantic per field, then the checks that span fields (names, ports, ranges, maps).

`validate` is the one way in; every problem comes back as one line naming its field and the fix.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from portfwd.addr import Endpoint, HostPorts, Transport, UnixPath, is_loopback
from portfwd.config.messages import problem
from portfwd.config.models import Config, ForwardConfig, GatewayForwardConfig, MapConfig
from portfwd.errors import ConfigError

#: Sections PRODUCT.md describes whose engines are not in this version yet.
_PLANNED_SECTIONS: dict[str, str] = {}


def _check_rules(config: Config) -> list[str]:
    """Cross-field checks pydantic cannot express per field; returns one line per problem."""
    problems: list[str] = []
    seen_names: dict[str, int] = {}
    bound: list[tuple[int, str, str, int]] = []  # (rule index, proto, host, port)
    for index, rule in enumerate(config.forward):
        field = f"forward[{index}]"
        if rule.name is not None:
            if rule.name in seen_names:
                problems.append(
                    f"{field}.name: {rule.name!r} is already the name of forward[{seen_names[rule.name]}]; "
                    "pick another name"
                )
            seen_names[rule.name] = index
        problems.extend(_check_backends(field, rule))
        if rule.proxy_protocol == "v1" and rule.protocol.has_udp:
            problems.append(
                f'{field}.proxy_protocol: "v1" names TCP connections only; use "v2" (each UDP '
                "datagram then begins with the header, as go-mmproxy reads it)"
            )
        if rule.accept_proxy_protocol and not rule.trusted_proxies:
            problems.append(
                f"{field}.trusted_proxies: accept_proxy_protocol believes only the proxies listed "
                'here; name them, e.g. trusted_proxies = ["10.0.0.5/32"]'
            )
        if rule.accept_proxy_protocol and (isinstance(rule.listen, UnixPath) or not rule.protocol.has_tcp):
            problems.append(
                f"{field}.accept_proxy_protocol: needs a TCP listener on an IP address "
                "(a PROXY header comes on TCP, from a proxy known by its address)"
            )
        limits = [
            name
            for name, value in (
                ("max_connections", rule.max_connections),
                ("max_connections_per_source", rule.max_connections_per_source),
                ("rate", rule.rate),
            )
            if value
        ]
        per_source = [name for name in limits if name != "max_connections"]
        if per_source and isinstance(rule.listen, UnixPath):
            problems.append(
                f"{field}.{per_source[0]}: a Unix socket's clients have no address to count by; "
                "use max_connections"
            )
        if rule.trusted_proxies and not rule.accept_proxy_protocol:
            problems.append(
                f"{field}.trusted_proxies: only read with accept_proxy_protocol = true; add it or remove this"
            )
        if isinstance(rule.listen, UnixPath) and (rule.allow or rule.deny or rule.route):
            problems.append(
                f"{field}.allow: allow, deny and route need an IP listener; "
                "a Unix socket has no client address (use file permissions instead)"
            )
        if isinstance(rule.listen, HostPorts):
            for proto in ("tcp", "udp"):
                if proto == "tcp" and not rule.protocol.has_tcp:
                    continue
                if proto == "udp" and not rule.protocol.has_udp:
                    continue
                for port in rule.listen.ports.ports():
                    clash = _clash(bound, proto, rule.listen.host, port)
                    if clash is not None and clash != index:
                        problems.append(
                            f"{field}.listen: {rule.listen.at(port)}/{proto} is already used by "
                            f"forward[{clash}]; give each rule its own port"
                        )
                        break
                    bound.append((index, proto, rule.listen.host, port))
    problems.extend(_check_tunnels(config))
    problems.extend(_check_gateway(config))
    problems.extend(_check_root_until_exit(config))
    problems.extend(_check_maps(config))
    if config.server is not None:
        server = config.server
        if not server.user:
            problems.append(
                "server: no [[server.user]]; add one with name and authorized_keys "
                "(portfwd server never runs without users)"
            )
        if not isinstance(server.listen, HostPorts) or len(server.listen.ports) != 1:
            problems.append('server.listen: must be one host:port; write "0.0.0.0:2222"')
        names = [user.name for user in server.user]
        for index, name in enumerate(names):
            if name in names[:index]:
                problems.append(f"server.user[{index}].name: {name!r} is listed twice")
    if config.metrics is not None:
        listen = config.metrics.listen
        if not isinstance(listen, HostPorts) or len(listen.ports) != 1:
            problems.append('metrics.listen: must be one host:port; write "127.0.0.1:9930"')
    if config.web is not None:
        problems.extend(_check_web(config))
    return problems


#: The shortest bearer token `[web]` takes: 128 bits of hex (`openssl rand -hex 16`).
MIN_TOKEN = 32


def _check_web(config: Config) -> list[str]:
    """`[web]`: one host:port, one token source, a token that is not guessable, and a token
    wherever someone other than this machine's users can reach the API."""
    web = config.web
    assert web is not None
    problems = []
    listen = web.listen
    if not isinstance(listen, HostPorts) or len(listen.ports) != 1:
        return ['web.listen: must be one host:port; write "127.0.0.1:9931"']
    if web.token is not None and web.token_file is not None:
        problems.append("web.token: give token or token_file, not both")
    if web.token is not None and len(web.token.strip()) < MIN_TOKEN:
        problems.append(
            f"web.token: too short ({len(web.token.strip())} characters); use at least {MIN_TOKEN}, "
            "e.g. the output of `openssl rand -hex 16`"
        )
    if web.auth == "all" and web.token is None and web.token_file is None:
        problems.append('web.auth: "all" needs a token to ask for; set web.token_file (or token)')
    elif web.token is None and web.token_file is None and not is_loopback(listen.host):
        where = f"{listen.host or '*'}:{listen.ports.first}"
        problems.append(
            f"web.listen: {where} is reachable from other hosts and [web] has no token; "
            'set web.token_file (or token), or listen on "127.0.0.1:9931"'
        )
    return problems


def published(config: Config) -> list[tuple[str, MapConfig]]:
    """Every router mapping the config asks for: `[[map]]` plus each `[[forward]]` with map = true.

    Returns (config field, mapping) pairs; a forward publishes its own listen port, per protocol.
    """
    maps = [(f"map[{index}]", entry) for index, entry in enumerate(config.map)]
    for index, rule in enumerate(config.forward):
        if not rule.map or not isinstance(rule.listen, HostPorts) or len(rule.listen.ports) != 1:
            continue
        port = rule.listen.ports.first
        for proto in ("tcp", "udp"):
            if (proto == "tcp" and rule.protocol.has_tcp) or (proto == "udp" and rule.protocol.has_udp):
                maps.append((f"forward[{index}].map", MapConfig(port=port, protocol=proto)))
    return maps


def _check_maps(config: Config) -> list[str]:
    problems: list[str] = []
    for index, rule in enumerate(config.forward):
        if rule.map and (not isinstance(rule.listen, HostPorts) or len(rule.listen.ports) != 1):
            problems.append(
                f"forward[{index}].map: only a rule that listens on one TCP/UDP port can be published; "
                "add a [[map]] per port instead"
            )
    claimed: dict[tuple[str, str, int], str] = {}
    for field, entry in published(config):
        keys = [("port", entry.protocol, entry.port)]
        if entry.external:
            keys.append(("external_port", entry.protocol, entry.external))
        for key in keys:
            other = claimed.get(key)
            if other is not None:
                what = "local port" if key[0] == "port" else "external port"
                problems.append(
                    f"{field}.{key[0]}: {what} {key[2]}/{key[1]} is already mapped by {other}; "
                    "map each port once"
                )
                break
        for key in keys:
            claimed.setdefault(key, field)
    return problems


def _check_tunnels(config: Config) -> list[str]:
    problems: list[str] = []
    names: dict[str, int] = {}
    for index, tunnel in enumerate(config.tunnel):
        field = f"tunnel[{index}]"
        if tunnel.name is not None:
            if tunnel.name in names:
                problems.append(
                    f"{field}.name: {tunnel.name!r} is already the name of tunnel[{names[tunnel.name]}]"
                )
            names[tunnel.name] = index
        if not tunnel.forwards:
            problems.append(f"{field}: no forward; add local, remote or dynamic (or -L/-R/-D)")
        if (tunnel.socks_user is None) != (tunnel.socks_password is None):
            problems.append(f"{field}.socks_user: set socks_user and socks_password together")
        if tunnel.reconnect_max < tunnel.reconnect_min:
            problems.append(
                f"{field}.reconnect_max: must be at least reconnect_min ({tunnel.reconnect_min:g}s)"
            )
    return problems


def _check_root_until_exit(config: Config) -> list[str]:
    """`user =` drops every capability after binding; the kernel's tables need CAP_NET_ADMIN
    until exit (to be removed), so they cannot go with it."""
    if config.user is None:
        return []
    needs = [
        f'forward[{index}].relay = "kernel"'
        for index, rule in enumerate(config.forward)
        if rule.relay == "kernel"
    ]
    if config.gateway is not None:
        needs.append("[gateway]")
    return [
        f"user: {what} needs CAP_NET_ADMIN until exit to remove its nftables table, and user = drops it; "
        "remove user = (run as root, or with CAP_NET_ADMIN)"
        for what in needs[:1]
    ]


def _check_gateway(config: Config) -> list[str]:
    gateway = config.gateway
    if gateway is None:
        return []
    problems: list[str] = []
    if gateway.wan == gateway.lan:
        problems.append("gateway.lan: must differ from gateway.wan")
    claimed: dict[tuple[str, int], int] = {}
    for index, rule in enumerate(gateway.forward):
        field = f"gateway.forward[{index}]"
        if len(rule.to.ports) not in (1, len(rule.port)):
            problems.append(
                f"{field}.to: port range {rule.to.ports} has {len(rule.to.ports)} ports but port {rule.port} "
                f"has {len(rule.port)}; use ranges of equal length or one target port"
            )
        problems.extend(_check_gateway_families(field, rule))
        clash = None
        for proto in ("tcp", "udp"):
            if (proto == "tcp" and not rule.protocol.has_tcp) or (
                proto == "udp" and not rule.protocol.has_udp
            ):
                continue
            for port in rule.port.ports():
                other = claimed.get((proto, port))
                if other is not None and other != index and clash is None:
                    clash = (
                        f"{field}.port: {port}/{proto} is already forwarded by gateway.forward[{other}]; "
                        "give each rule its own port"
                    )
                claimed[(proto, port)] = index
        if clash:
            problems.append(clash)
    return problems


def _check_gateway_families(field: str, rule: GatewayForwardConfig) -> list[str]:
    """An IPv6 target is a pinhole (no translation): its ports are the WAN ports; allow lists
    name networks of the target's family."""
    problems = []
    v6 = ":" in rule.to.host
    if v6 and (rule.to.ports.first, rule.to.ports.last) != (rule.port.first, rule.port.last):
        problems.append(
            f"{field}.to: {rule.to} is IPv6, which the gateway opens rather than translates, so its "
            f'port(s) must be the WAN port(s); write to = "[{rule.to.host}]:{rule.port}"'
        )
    for network in rule.allow:
        if (network.version == 6) != v6:
            problems.append(
                f"{field}.allow: {network} is IPv{network.version} but the target {rule.to.host} is "
                f"IPv{6 if v6 else 4}; list networks of the target's family"
            )
            break
    return problems


_ANY_ADDRESSES = ("", "0.0.0.0", "::")


def _clash(bound: list[tuple[int, str, str, int]], proto: str, host: str, port: int) -> int | None:
    for index, other_proto, other_host, other_port in bound:
        if (
            other_proto == proto
            and other_port == port
            and (other_host == host or other_host in _ANY_ADDRESSES or host in _ANY_ADDRESSES)
        ):
            return index
    return None


def _check_backends(field: str, rule: ForwardConfig) -> list[str]:
    """The rule's targets: `connect` or `[[forward.backend]]` (one of them), their names, the
    routes that name them, and the health check's fit to the protocol."""
    if rule.connect and rule.backend:
        return [f"{field}.backend: give connect or [[forward.backend]] tables, not both"]
    if not rule.connect and not rule.backend:
        return [f"{field}.connect: required key is missing; add it"]
    problems: list[str] = []
    for index, backend in enumerate(rule.targets):
        key = (
            f"backend[{index}].connect"
            if rule.backend
            else ("connect" if len(rule.connect) == 1 else f"connect[{index}]")
        )
        problems.extend(_check_sides(field, rule.listen, backend.connect, rule.protocol, key))
    names: dict[str, int] = {}
    for index, backend in enumerate(rule.backend):
        if backend.name is not None:
            if backend.name in names:
                problems.append(
                    f"{field}.backend[{index}].name: {backend.name!r} is already "
                    f"backend[{names[backend.name]}]'s; give each backend its own name"
                )
            names[backend.name] = index
    if rule.backend and all(backend.backup for backend in rule.backend):
        problems.append(f"{field}.backend: every backend is a backup; make at least one backup = false")
    for index, route in enumerate(rule.route):
        where = f"{field}.route[{index}]"
        if route.connect is None and route.backend is None:
            problems.append(f"{where}.connect: required key is missing; add it")
        elif route.connect is not None and route.backend is not None:
            problems.append(f"{where}.backend: give connect or backend, not both")
        elif route.connect is not None:
            problems.extend(_check_sides(where, rule.listen, route.connect, rule.protocol, "connect"))
        elif route.backend not in names:
            known = ", ".join(repr(name) for name in names) or "none has a name"
            problems.append(
                f"{where}.backend: no backend is named {route.backend!r} ({known}); "
                "name one in [[forward.backend]]"
            )
    health = rule.health
    if health is not None and health.check == "tcp":
        if health.timeout > health.interval:
            problems.append(
                f"{field}.health.timeout: {health.timeout:g}s is longer than interval "
                f"({health.interval:g}s); a check must end before the next begins"
            )
        if not rule.protocol.has_tcp and (health.send is None or health.expect is None):
            problems.append(
                f"{field}.health.send: a UDP rule's check sends a datagram and waits for an answer; "
                'give send and expect, or check = "none"'
            )
    tcp_only = [
        name
        for name, value in (
            ("bandwidth", rule.bandwidth),
            ("bandwidth_per_connection", rule.bandwidth_per_connection),
            ("transparent", rule.transparent),
        )
        if value
    ]
    if tcp_only and not rule.protocol.has_tcp:
        problems.append(
            f"{field}.{tcp_only[0]}: TCP only in this version; this rule is {rule.protocol.value}"
        )
    if (rule.bandwidth or rule.bandwidth_per_connection) and rule.relay == "splice":
        problems.append(
            f'{field}.relay: "splice" moves bytes in the kernel, past any bandwidth limit; '
            'remove relay = "splice" (a limited rule uses the protocol relay)'
        )
    if rule.transparent and (
        isinstance(rule.listen, UnixPath) or any(isinstance(b.connect, UnixPath) for b in rule.targets)
    ):
        problems.append(
            f"{field}.transparent: needs IP on both sides (the upstream connection leaves from "
            "the client's address); remove it or use IP addresses"
        )
    return problems


def _check_sides(field: str, listen: Endpoint, connect: Endpoint, protocol: Transport, key: str) -> list[str]:
    problems = []
    if protocol.has_udp and isinstance(listen, UnixPath):
        problems.append(f'{field}.listen: UDP cannot listen on a Unix stream socket; use protocol = "tcp"')
    if protocol.has_udp and isinstance(connect, UnixPath):
        problems.append(f'{field}.{key}: UDP cannot reach a Unix stream socket; use protocol = "tcp"')
    if isinstance(listen, HostPorts) and isinstance(connect, HostPorts):
        wanted, got = len(listen.ports), len(connect.ports)
        if got not in (1, wanted):
            problems.append(
                f"{field}.{key}: port range {connect.ports} has {got} ports but listen "
                f"{listen.ports} has {wanted}; use ranges of equal length or one target port"
            )
    if isinstance(listen, UnixPath) and isinstance(connect, HostPorts) and len(connect.ports) > 1:
        problems.append(f"{field}.{key}: a Unix socket listener needs one target port, not a range")
    return problems


def validate(data: dict[str, Any], source: str = "config") -> Config:
    """Validate parsed TOML (or CLI-built) data into a Config.

    Raises ConfigError carrying one line per problem, each naming its field and the fix.
    """
    problems: list[str] = []
    for section, what in _PLANNED_SECTIONS.items():
        if section in data:
            problems.append(
                f"{section}: {what} is not available in portfwd 0.1 yet; remove this section to run the rest"
            )
    data = {key: value for key, value in data.items() if key not in _PLANNED_SECTIONS}
    config = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(problem(error) for error in exc.errors(include_url=False))
        _missing_targets(data, problems)
    if config is not None:
        problems.extend(_check_rules(config))
    if config is not None and not problems and not _declares_anything(config):
        # `run` would start nothing and exit: `check` must not call that OK.
        problems.append(
            "nothing to run: the config has no [[forward]], [[tunnel]], [server], [gateway], "
            "[[map]], [metrics] or [web]; add one"
        )
    if problems:
        raise ConfigError(problems[0], problems=problems)
    assert config is not None  # for mypy: no problems means validation succeeded
    return config


def _missing_targets(data: dict[str, Any], problems: list[str]) -> None:
    """A rule (or route) with neither `connect` nor `backend` is told so even when other fields
    failed first (the cross checks that say it otherwise run only on a valid config); the line
    goes where pydantic would put a missing field's: after the rule's field problems, before
    its unknown keys."""
    rules = data.get("forward")
    if not isinstance(rules, list):
        return
    for index, rule in enumerate(rules):
        if not isinstance(rule, dict):
            continue
        missing = []
        if "connect" not in rule and "backend" not in rule:
            missing.append(f"forward[{index}].connect: required key is missing; add it")
        routes = rule.get("route")
        for number, route in enumerate(routes if isinstance(routes, list) else []):
            if isinstance(route, dict) and "connect" not in route and "backend" not in route:
                missing.append(f"forward[{index}].route[{number}].connect: required key is missing; add it")
        if not missing:
            continue
        mine = [at for at, line in enumerate(problems) if line.startswith(f"forward[{index}].")]
        unknown = [at for at in mine if ": unknown key;" in problems[at]]  # pydantic puts these last
        later = [at for at, line in enumerate(problems) if _rule_index(line) > index]
        at = unknown[0] if unknown else mine[-1] + 1 if mine else (later[0] if later else len(problems))
        problems[at:at] = missing


def _rule_index(line: str) -> int:
    """The rule a problem line names (`forward[3].x: ...` is 3), or -1."""
    if not line.startswith("forward["):
        return -1
    number = line[len("forward[") :].split("]", 1)[0]
    return int(number) if number.isdigit() else -1


def _declares_anything(config: Config) -> bool:
    return bool(
        config.forward
        or config.tunnel
        or config.server
        or config.gateway
        or config.map
        or config.metrics
        or config.web
    )
