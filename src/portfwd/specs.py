"""What the engine runs: frozen, plain specs of each part, made from a validated config by `planner`.

The engine (relay, ssh, kernel, router, runtime, metrics, control) reads these and never the
pydantic models of `config`, so it does not depend on how the file is written, and a test or
another front end (the CLI's `forward`/`ssh` specs, later an HTTP API) can build them directly.
The types carry what validation proved: a listener that must be one port is an `Address`, not
an endpoint that might be a range or a path. Specs are hashable: a reload is a diff of specs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

from portfwd.addr import Endpoint, HostPorts, PortRange, Transport, format_host
from portfwd.tunnelspec import StartupsSpec, TunnelForward

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
RelayChoice = Literal["auto", "kernel", "splice", "protocol"]
#: `[server] max_startups` when not given: refuse 30 % of new connections from 10 unauthenticated
#: on, all at 60 (sshd's 10:30:100, with a lower cap, as each costs portfwd more).
MAX_STARTUPS = StartupsSpec(10, 30, 60)


@dataclass(frozen=True, slots=True)
class Address:
    """One IP listener of one port (`host == ""`: every address), as metrics and the server bind."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{format_host(self.host)}:{self.port}"


Balance = Literal["round-robin", "least-connections", "source-hash", "first"]


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """Clients from `source` go to `connect` instead of the rule's target, or, with `backend`
    (an index into the rule's backends), to that backend while it is up."""

    source: tuple[Network, ...]
    connect: Endpoint
    backend: int | None = None


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One of a rule's targets."""

    connect: Endpoint
    name: str  #: as given, else the target as written
    weight: int = 1
    backup: bool = False  #: only while no other backend is up


@dataclass(frozen=True, slots=True)
class HealthSpec:
    """How a rule's backends are checked: actively (`interval` > 0) and passively."""

    interval: float = 0.0  #: seconds between active checks; 0: none
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    send: bytes = b""
    expect: bytes = b""
    passive_fall: int = 3  #: failed connects in a row that take a backend down; 0: never
    passive_down: float = 10.0


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One userspace forward rule (`[[forward]]`, or a `portfwd forward` spec)."""

    label: str  #: its name, or its listen side (with /udp) when it has none
    name: str | None
    listen: Endpoint
    connect: Endpoint  #: the first backend's target (the only one, for most rules)
    protocol: Transport = Transport.TCP
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    route: tuple[RouteSpec, ...] = ()
    udp_idle_timeout: float = 60.0
    udp_max_flows: int = 1024
    connect_timeout: float = 10.0
    relay: RelayChoice = "auto"
    dual_stack: bool = False
    backlog: int = 1024
    #: With workers: True, one accept queue per process (SO_REUSEPORT, the kernel's hash picks);
    #: False, one queue all take from; None, shared on the C engine, else per process.
    reuseport: bool | None = None
    tcp_keepalive: bool = True  #: on both sides of every TCP session (relay/listener.KEEPALIVE)
    idle_timeout: float | None = None  #: close a TCP session that moved no byte for this long
    proxy_protocol: int = 0  #: 1 or 2: send the client's address first, as a PROXY header (TCP)
    accept_proxy: bool = False  #: read a PROXY header from each client first (TCP)...
    trusted_proxies: tuple[Network, ...] = ()  #: ...which only these may send
    max_connections: int = 0  #: at once, for the whole rule (TCP); 0: no limit
    max_connections_per_source: int = 0  #: at once, from one client address; 0: no limit
    rate: tuple[int, float] | None = None  #: new connections per client address: (count, seconds)
    #: Several targets, balanced (empty: `connect` is the one target, on the fast path).
    backends: tuple[BackendSpec, ...] = ()
    balance: Balance = "round-robin"
    health: HealthSpec = HealthSpec()
    bandwidth: float = 0.0  #: bytes a second, each way, for the whole rule; 0: no limit
    bandwidth_per_connection: float = 0.0  #: bytes a second, each way, for each connection
    transparent: bool = False  #: upstream connections leave from the client's address
    #: Where the rule was written, for errors (`forward[2] (web)`); not part of its identity, so
    #: a rule that only moved in the file is kept by a reload.
    where: str = field(default="forward", compare=False)


#: The ssh_config files ssh reads when not given one (-F): the user's, then the system's; the
#: first value of each keyword wins across both.
SSH_CONFIGS = ("~/.ssh/config", "/etc/ssh/ssh_config")
#: ssh's UserKnownHostsFile and GlobalKnownHostsFile defaults (ssh_config(5)).
USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")


@dataclass(frozen=True, slots=True)
class TunnelSpec:
    """One SSH connection and the forwards it carries (`[[tunnel]]`, or `portfwd ssh`)."""

    label: str  #: its name, or its destination
    ssh: str  #: the destination as written ([user@]host[:port])
    user: str | None  #: from `user`, else the destination's, else None (ssh_config or login name)
    host: str
    port: int | None  #: from `port`, else the destination's, else None (ssh_config or 22)
    identity: tuple[str, ...] = ()
    agent: bool = True
    #: ssh's IdentitiesOnly: of the agent's keys, only the copies of `identity` (or of the
    #: default key files when it names none) are offered.
    identities_only: bool = False
    known_hosts: tuple[str, ...] = USER_KNOWN_HOSTS
    #: Read too, never written (ssh's GlobalKnownHostsFile): the host keys an admin vouches for.
    global_known_hosts: tuple[str, ...] = GLOBAL_KNOWN_HOSTS
    #: ssh's HashKnownHosts: a key accept-new records is filed under a hash of the host's name.
    hash_known_hosts: bool = False
    strict_host_key_checking: Literal["yes", "accept-new"] = "yes"
    jump: tuple[str, ...] = ()
    #: With no `jump`, follow ssh_config's ProxyJump for the host at connect time (a [[tunnel]]);
    #: False: the front end resolved it already, `-o ProxyJump=none` included (`portfwd ssh`).
    jump_from_ssh_config: bool = True
    ssh_config: tuple[str, ...] | None = None
    local: tuple[TunnelForward, ...] = ()
    remote: tuple[TunnelForward, ...] = ()
    dynamic: tuple[TunnelForward, ...] = ()
    keepalive_interval: float = 15.0
    keepalive_count: int = 3
    connect_timeout: float = 10.0
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    reconnect_attempts: int = 0
    exit_on_forward_failure: bool = False
    compression: bool = False
    kex: tuple[str, ...] = ()
    ciphers: tuple[str, ...] = ()
    macs: tuple[str, ...] = ()
    host_key_algorithms: tuple[str, ...] = ()
    socks_credentials: tuple[str, str] | None = None  #: (user, password) the SOCKS fronts ask for
    tcp_keepalive: bool = True  #: on the local side of every -L/-D/-R connection
    idle_timeout: float | None = None  #: close a forwarded connection idle this long
    #: Retry a first connect that fails for good (unknown host name, authentication refused, no
    #: common algorithm); False: such a failure ends `portfwd ssh`, or leaves a [[tunnel]] failed.
    retry_first_connect: bool = False
    #: socket.AF_INET or AF_INET6 (-4/-6): the SSH connection's and the -L/-D listeners' family;
    #: 0: any (the listeners then take 127.0.0.1 and ::1, as ssh).
    family: int = 0
    #: The `identity` keys already read (asyncssh key pairs) by a front end that could ask for a
    #: passphrase (`portfwd ssh`, ssh/keys.py); None: read `identity` at each connect.
    client_keys: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def forwards(self) -> tuple[TunnelForward, ...]:
        """Every forward, -L then -R then -D."""
        return (*self.local, *self.remote, *self.dynamic)


@dataclass(frozen=True, slots=True)
class ServerUserSpec:
    """Who may log in to the tunnel server, with which keys, to forward what."""

    name: str
    authorized_keys: str
    permit_open: tuple[str, ...] = ()
    permit_listen: tuple[str, ...] = ()
    source: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """The SSH tunnel server (`[server]`); the comments give OpenSSH's names and defaults."""

    listen: Address
    host_key: str
    users: tuple[ServerUserSpec, ...]
    gateway_ports: bool = False
    client_alive_interval: float = 15.0
    client_alive_count: int = 3
    max_auth_failures: int = 10
    login_grace_time: float = 30.0  #: LoginGraceTime 120
    max_startups: StartupsSpec = MAX_STARTUPS  #: MaxStartups 10:30:100
    max_auth_tries: int = 6  #: MaxAuthTries 6
    max_channels: int = 256
    max_channels_per_user: int = 1024
    #: A second client of the same user and key asking for a held -R port takes it over only if
    #: the holder fails a keepalive probe within this time (sshd refuses the newcomer outright).
    takeover_probe: float = 3.0
    kex: tuple[str, ...] = ()  #: () offers all of sshalgorithms.KEX; a list narrows it (so below)
    ciphers: tuple[str, ...] = ()
    macs: tuple[str, ...] = ()
    host_key_algorithms: tuple[str, ...] = ()
    tcp_keepalive: bool = True
    idle_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class GatewayForwardSpec:
    """A WAN port (or range) DNATed by the kernel to a LAN host's IPv4 address, or, for an IPv6
    host, a pinhole: the same port(s) let through the IPv6 firewall, untranslated."""

    label: str
    name: str | None
    port: PortRange
    to: HostPorts  #: host is an IP literal (validated; the kernel resolves no names)
    protocol: Transport = Transport.TCP
    allow: tuple[Network, ...] = ()

    @property
    def pinhole(self) -> bool:
        """An IPv6 target: opened in the firewall, not translated."""
        return ":" in self.to.host


@dataclass(frozen=True, slots=True)
class GatewayTriggerSpec:
    """A LAN host connecting out on `trigger` gets `open` forwarded to it."""

    name: str | None
    trigger: tuple[str, PortRange]
    open: tuple[tuple[str, PortRange], ...]
    idle_timeout: float = 600.0
    mode: Literal["kernel", "last-wins"] = "kernel"


@dataclass(frozen=True, slots=True)
class GatewayHASpec:
    """Two routers: keepalived moves the virtual addresses to the master (VRRP over the sync
    link), conntrackd keeps both routers' NAT state (so flows survive a failover)."""

    peer: str  #: the other router's IPv4 address on the sync link
    virtual_addresses: tuple[ipaddress.IPv4Interface, ...]  #: on the WAN or LAN, by their network
    sync_interface: str
    priority: int = 100
    router_id: int = 51
    advert_interval: float = 1.0


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    """nftables DNAT, masquerade and hairpin on a Linux router."""

    wan: str
    lan: str
    masquerade: bool = True
    hairpin: bool = True
    allow_external_target: bool = False
    enable_forwarding: bool = False
    ipv6_firewall: bool = False  #: drop inbound IPv6 to the LAN but replies and pinholes
    open_other_tables: bool = False  #: insert accepts into other tables' forward chains that drop
    flowtable: bool = False  #: offload established flows to an nftables flowtable
    ha: GatewayHASpec | None = None
    forward: tuple[GatewayForwardSpec, ...] = ()
    trigger: tuple[GatewayTriggerSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class ControlSpec:
    """The local control socket `portfwd status` reads."""

    enabled: bool = True
    socket: str | None = None
    group: str | None = None


@dataclass(frozen=True, slots=True)
class MapSpec:
    """One router mapping: `external` on the router to this host's `port` (0 = what it offers)."""

    name: str  #: the config field that asked for it (`map[0]`, `forward[2].map`)
    protocol: Literal["tcp", "udp"]
    port: int
    external: int
    lease: int  #: seconds, at least 1
    method: Literal["auto", "pcp", "natpmp", "upnp"] = "auto"
    upnp_url: str | None = None
    gateway: str | None = None  #: the router's IPv4 address; None = the default route's


@dataclass(frozen=True, slots=True)
class WebSpec:
    """`[web]`: the dashboard and HTTP API at `listen`.

    `token` (None: no token, so every action is refused) is what a request's
    `Authorization: Bearer` must carry for actions, and for reads too with `auth == "all"`.
    `metrics`: /metrics is served here as well (`[metrics]` names the same listener).
    """

    listen: Address
    token: str | None = field(default=None, repr=False)
    auth: Literal["actions", "all"] = "actions"
    metrics: bool = False
    #: DNS names a request's Host may give (besides addresses and localhost), lower case.
    hosts: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything one instance runs; `runtime.Runtime` starts it and applies a new one on reload."""

    rules: tuple[RuleSpec, ...] = ()
    tunnels: tuple[TunnelSpec, ...] = ()
    server: ServerSpec | None = None
    gateway: GatewaySpec | None = None
    maps: tuple[MapSpec, ...] = ()
    metrics: Address | None = None
    web: WebSpec | None = None
    control: ControlSpec = ControlSpec()
    user: str | None = None  #: drop root to this user once everything is bound
    group: str | None = None
    drain_timeout: float = 10.0
    ssh_fast_path: bool = True
    workers: int = 1  #: processes relaying the rules that can be shared (services/workers.py)

    @property
    def empty(self) -> bool:
        """True when there is nothing to run (a config of only [control], say)."""
        return not (
            self.rules or self.tunnels or self.server or self.gateway or self.maps or self.metrics or self.web
        )
