"""The config file's pydantic models, one per table; every model is frozen and forbids unknown keys.

Field types and their messages are in `fields.py`; checks that span fields are in `checks.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from portfwd.addr import Transport, parse_listen
from portfwd.config.fields import (
    Bandwidth,
    Ciphers,
    Destination,
    Duration,
    DynamicForwards,
    ExternalPort,
    HostKeyAlgorithms,
    HostNames,
    Interface,
    IPv4,
    Kex,
    KnownHostsPaths,
    LanTarget,
    ListenEndpoint,
    LocalForwards,
    Macs,
    MapMethod,
    Name,
    Networks,
    Paths,
    Peer,
    Permits,
    Probe,
    ProtoPorts,
    ProtoPortsList,
    Rate,
    RemoteForwards,
    SecondsOrOff,
    Startups,
    Strictness,
    TargetEndpoint,
    Targets,
    Url,
    VirtualAddresses,
    WanPorts,
    Workers,
)
from portfwd.specs import GLOBAL_KNOWN_HOSTS, USER_KNOWN_HOSTS
from portfwd.tunnelspec import StartupsSpec, TunnelForward


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class RouteConfig(_Model):
    """`[[forward.route]]`: clients from `source` go to `connect` (or to the rule's `backend`
    of that name) instead of the rule's balancing."""

    source: Networks
    connect: TargetEndpoint | None = None
    backend: Name | None = None


class BackendConfig(_Model):
    """`[[forward.backend]]`: one of a rule's targets, with its share and role."""

    connect: TargetEndpoint
    name: Name | None = None
    weight: int = Field(default=1, ge=1, le=256)
    backup: StrictBool = False  # used only while no other backend is up


class HealthConfig(_Model):
    """`[forward.health]`: active checks of each backend (haproxy's `check inter rise fall`),
    and the passive check every rule with several backends has."""

    check: Literal["tcp", "none"] = "tcp"  # "tcp": connect (then send/expect, if given)
    interval: Duration = 2.0
    timeout: Duration = 1.0
    rise: int = Field(default=2, ge=1, le=100)  # passed checks in a row that bring a backend up
    fall: int = Field(default=3, ge=1, le=100)  # failed checks in a row that take it down
    send: Probe | None = None
    expect: Probe | None = None  # the answer must contain this (within 64 KiB)
    passive_fall: int = Field(default=3, ge=0, le=1000)  # failed connects in a row: down; 0: off
    passive_down: Duration = 10.0  # ...for this long (or until an active check passes)


class ForwardConfig(_Model):
    """`[[forward]]`: one userspace proxy rule."""

    name: Name | None = None
    listen: ListenEndpoint
    connect: Targets = ()  # one target, or several (balanced); or [[forward.backend]] tables
    backend: tuple[BackendConfig, ...] = ()
    balance: Literal["round-robin", "least-connections", "source-hash", "first"] = "round-robin"
    health: HealthConfig | None = None
    protocol: Transport = Transport.TCP
    allow: Networks = ()
    deny: Networks = ()
    route: tuple[RouteConfig, ...] = ()
    udp_idle_timeout: Duration = 60.0
    udp_max_flows: int = Field(default=1024, ge=1, le=1_000_000)
    connect_timeout: Duration = 10.0
    relay: Literal["auto", "kernel", "splice", "protocol"] = "auto"
    dual_stack: StrictBool = False
    backlog: int = Field(default=1024, ge=1, le=65535)
    # With workers: one accept queue per process (SO_REUSEPORT) or one they share; None: shared
    # where the C engine relays the rule, per process otherwise (services/rules.py).
    reuseport: StrictBool | None = None
    map: StrictBool = False
    tcp_keepalive: StrictBool = True  # on both sides of every TCP session (relay/listener.KEEPALIVE)
    idle_timeout: Duration | None = None  # close a TCP session that moved no byte for this long
    proxy_protocol: Literal["v1", "v2"] | None = None  # a PROXY header to the target first (TCP)
    accept_proxy_protocol: StrictBool = False  # each client starts with a PROXY header (TCP)...
    trusted_proxies: Networks = ()  # ...sent only by these (anyone else is refused)
    max_connections: int | None = Field(default=None, ge=1, le=10_000_000)  # at once, the rule's (TCP)
    max_connections_per_source: int | None = Field(
        default=None, ge=1, le=10_000_000
    )  # at once, per client address
    rate: Rate | None = (
        None  # new connections per client address, e.g. "20/s" (a burst of 20, then 20 a second)
    )
    bandwidth: Bandwidth | None = None  # the rule's whole traffic, each way, e.g. "100Mbit"
    bandwidth_per_connection: Bandwidth | None = None  # each connection's, each way
    transparent: StrictBool = False  # upstream connections leave from the client's own address

    @property
    def targets(self) -> tuple[BackendConfig, ...]:
        """Every backend: the `connect` list's (weight 1) or the `[[forward.backend]]` tables."""
        if self.backend:
            return self.backend
        return tuple(  # already validated: built without a second pass
            BackendConfig.model_construct(connect=target, name=None, weight=1, backup=False)
            for target in self.connect
        )

    @property
    def label(self) -> str:
        """The rule's name for logs and tables; defaults to its listen side."""
        if self.name is not None:
            return self.name
        suffix = "" if self.protocol is Transport.TCP else f"/{self.protocol.value}"
        return f"{self.listen}{suffix}"


class TunnelConfig(_Model):
    """`[[tunnel]]`: one SSH connection and the forwards it carries (what `portfwd ssh` builds)."""

    name: Name | None = None
    ssh: Destination
    port: int | None = Field(default=None, ge=1, le=65535)
    user: str | None = Field(default=None, min_length=1)
    identity: Paths = ()
    agent: StrictBool = True
    identities_only: StrictBool = False
    known_hosts: KnownHostsPaths = USER_KNOWN_HOSTS
    global_known_hosts: KnownHostsPaths = GLOBAL_KNOWN_HOSTS
    hash_known_hosts: StrictBool = False
    strict_host_key_checking: Strictness = "yes"
    jump: tuple[Destination, ...] = ()
    ssh_config: Paths | None = None
    local: LocalForwards = ()
    remote: RemoteForwards = ()
    dynamic: DynamicForwards = ()
    keepalive_interval: SecondsOrOff = 15.0
    keepalive_count: int = Field(default=3, ge=1, le=1000)
    connect_timeout: Duration = 10.0
    reconnect_min: Duration = 1.0
    reconnect_max: Duration = 60.0
    reconnect_attempts: int = Field(default=0, ge=0)
    exit_on_forward_failure: StrictBool = False
    compression: StrictBool = False
    kex: Kex = ()
    ciphers: Ciphers = ()
    macs: Macs = ()
    host_key_algorithms: HostKeyAlgorithms = ()
    socks_user: str | None = Field(default=None, min_length=1, max_length=255)
    socks_password: str | None = Field(default=None, min_length=1, max_length=255)
    tcp_keepalive: StrictBool = True  # on the local side of every -L/-D/-R connection
    idle_timeout: Duration | None = None  # close a forwarded connection idle this long
    # A first connect refused for good (unknown host, authentication, algorithms) is retried
    # like a lost link, instead of leaving the tunnel failed (autossh's AUTOSSH_GATETIME=0).
    retry_first_connect: StrictBool = False

    @property
    def label(self) -> str:
        """The tunnel's name for logs and tables; defaults to its destination."""
        return self.name if self.name is not None else self.ssh

    @property
    def forwards(self) -> tuple[TunnelForward, ...]:
        """Every forward, -L then -R then -D."""
        return (*self.local, *self.remote, *self.dynamic)


class ServerUserConfig(_Model):
    """`[[server.user]]`: who may log in to `portfwd server`, with which keys, to forward what."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    authorized_keys: str = Field(min_length=1)
    permit_open: Permits = ()
    permit_listen: Permits = ()
    source: Networks = Field(default=(), alias="from")


class ServerConfig(_Model):
    """`[server]`: the SSH tunnel server stock `ssh -L/-R/-D` clients use."""

    listen: ListenEndpoint = Field(default_factory=lambda: parse_listen("0.0.0.0:2222"))
    host_key: str = Field(default="/var/lib/portfwd/host_ed25519", min_length=1)
    gateway_ports: StrictBool = False
    client_alive_interval: SecondsOrOff = 15.0
    client_alive_count: int = Field(default=3, ge=1, le=1000)
    max_auth_failures: int = Field(default=10, ge=1, le=100000)
    # Before authentication (sshd: LoginGraceTime 120, MaxStartups 10:30:100, MaxAuthTries 6).
    login_grace_time: Duration = 30.0
    max_startups: Startups = StartupsSpec(10, 30, 60)
    max_auth_tries: int = Field(default=6, ge=1, le=100)
    # After authentication: open channels (-L/-D connections and -R hand-backs).
    max_channels: int = Field(default=256, ge=1, le=100000)
    max_channels_per_user: int = Field(default=1024, ge=1, le=1000000)
    # A second client of the same user and key asking for a held -R port takes it over only if
    # the holder fails a keepalive probe within this time (sshd refuses the newcomer outright).
    takeover_probe: Duration = 3.0
    kex: Kex = ()  # () offers all of sshalgorithms.KEX; a list narrows it (so for the three below)
    ciphers: Ciphers = ()
    macs: Macs = ()
    host_key_algorithms: HostKeyAlgorithms = ()
    # Relayed connections: TCP keepalive on the server's side of each, and an optional idle cap.
    tcp_keepalive: StrictBool = True
    idle_timeout: Duration | None = None
    user: tuple[ServerUserConfig, ...] = ()


class GatewayForwardConfig(_Model):
    """`[[gateway.forward]]`: a WAN port (or range) DNATed to a LAN host by the kernel."""

    name: Name | None = None
    port: WanPorts
    to: LanTarget
    protocol: Transport = Transport.TCP
    allow: Networks = ()

    @property
    def label(self) -> str:
        """Name for logs and tables; defaults to the WAN port."""
        return self.name or f"wan:{self.port}/{self.protocol.value} -> {self.to}"


class GatewayTriggerConfig(_Model):
    """`[[gateway.trigger]]`: a LAN host connecting out on `trigger` gets `open` forwarded to it."""

    name: Name | None = None
    trigger: ProtoPorts
    open: ProtoPortsList
    idle_timeout: Duration = 600.0
    mode: Literal["kernel", "last-wins"] = "kernel"


class GatewayHAConfig(_Model):
    """`[gateway.ha]`: two routers, keepalived (VRRP) moving the virtual addresses, conntrackd
    keeping the NAT state of both."""

    peer: Peer
    virtual_addresses: VirtualAddresses
    sync_interface: Interface
    priority: int = Field(default=100, ge=1, le=254)  # the higher one is the master while both are up
    router_id: int = Field(default=51, ge=1, le=255)  # VRRP's virtual router id, the same on both
    advert_interval: Duration = 1.0  # seconds between VRRP adverts; a backup takes over after ~3


class GatewayConfig(_Model):
    """`[gateway]`: nftables DNAT, masquerade and hairpin on a Linux router."""

    wan: Interface
    lan: Interface
    masquerade: StrictBool = True
    hairpin: StrictBool = True
    allow_external_target: StrictBool = False
    enable_forwarding: StrictBool = False
    # Inbound IPv6 to the LAN dropped but for replies and pinholes; None: on with
    # enable_forwarding or an IPv6 forward.
    ipv6_firewall: StrictBool | None = None
    open_other_tables: StrictBool = False  # insert portfwd's accepts into forward chains that drop
    flowtable: StrictBool = False  # offload established flows (where the kernel has flowtables)
    ha: GatewayHAConfig | None = None
    forward: tuple[GatewayForwardConfig, ...] = ()
    trigger: tuple[GatewayTriggerConfig, ...] = ()


class MapConfig(_Model):
    """`[[map]]`: ask the home router to forward `external_port` to this host's `port`."""

    port: int = Field(ge=1, le=65535)
    external_port: ExternalPort | None = None
    protocol: Literal["tcp", "udp"] = "tcp"
    method: MapMethod = "auto"
    lease: Duration = 3600.0
    upnp_url: Url | None = None
    gateway: IPv4 | None = None

    @property
    def external(self) -> int:
        """The external port to ask for; 0 = whatever the router offers."""
        return self.port if self.external_port is None else self.external_port

    @property
    def label(self) -> str:
        return f"{self.port}/{self.protocol}"


class MetricsConfig(_Model):
    """`[metrics]`: where the Prometheus endpoint listens."""

    listen: ListenEndpoint = Field(default_factory=lambda: parse_listen("127.0.0.1:9930"))


class WebConfig(_Model):
    """`[web]`: the dashboard and the HTTP API (loopback unless told; a token for actions)."""

    listen: ListenEndpoint = Field(default_factory=lambda: parse_listen("127.0.0.1:9931"))
    token: str | None = Field(default=None, min_length=1)
    token_file: str | None = Field(default=None, min_length=1)
    auth: Literal["actions", "all"] = "actions"
    # DNS names the dashboard is reached by (the Host header), besides addresses and localhost.
    hosts: HostNames = ()


class ControlConfig(_Model):
    """`[control]`: the local control socket `portfwd status` reads."""

    socket: str | None = Field(default=None, min_length=1)
    group: str | None = Field(default=None, min_length=1)
    enabled: StrictBool = True


class Config(_Model):
    """The whole config file."""

    user: str | None = Field(default=None, min_length=1)
    group: str | None = Field(default=None, min_length=1)
    drain_timeout: Duration = 10.0
    ssh_fast_path: StrictBool = True
    # Processes that relay the [[forward]] rules (sharing the listeners); "auto": one per core.
    workers: Workers = "auto"
    forward: tuple[ForwardConfig, ...] = ()
    tunnel: tuple[TunnelConfig, ...] = ()
    server: ServerConfig | None = None
    gateway: GatewayConfig | None = None
    map: tuple[MapConfig, ...] = ()
    metrics: MetricsConfig | None = None
    web: WebConfig | None = None
    control: ControlConfig = ControlConfig()
