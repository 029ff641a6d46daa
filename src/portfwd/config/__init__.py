"""The config file: TOML in, validated frozen pydantic models out, every problem as one line.

The only package that imports pydantic (an import-linter contract says so): `fields` (value
types and their messages), `models` (one model per table), `messages` (pydantic's errors in
portfwd's words), `checks` (`validate`: per field, then across fields) and `files` (find, read,
`load`). `planner` turns a `Config` into the specs the engine runs.
"""

from portfwd.config.checks import MIN_TOKEN, published, validate
from portfwd.config.fields import (
    Ciphers,
    Duration,
    HostKeyAlgorithms,
    Kex,
    ListenEndpoint,
    Macs,
    MapMethod,
    Name,
    Network,
    Networks,
    Paths,
    Permits,
    TargetEndpoint,
    parse_network,
)
from portfwd.config.files import MAX_CONFIG_BYTES, control_socket, find, load
from portfwd.config.models import (
    Config,
    ControlConfig,
    ForwardConfig,
    GatewayConfig,
    GatewayForwardConfig,
    GatewayTriggerConfig,
    MapConfig,
    MetricsConfig,
    RouteConfig,
    ServerConfig,
    ServerUserConfig,
    TunnelConfig,
    WebConfig,
)

__all__ = [
    "MAX_CONFIG_BYTES",
    "MIN_TOKEN",
    "Ciphers",
    "Config",
    "ControlConfig",
    "Duration",
    "ForwardConfig",
    "GatewayConfig",
    "GatewayForwardConfig",
    "GatewayTriggerConfig",
    "HostKeyAlgorithms",
    "Kex",
    "ListenEndpoint",
    "Macs",
    "MapConfig",
    "MapMethod",
    "MetricsConfig",
    "Name",
    "Network",
    "Networks",
    "Paths",
    "Permits",
    "RouteConfig",
    "ServerConfig",
    "ServerUserConfig",
    "TargetEndpoint",
    "TunnelConfig",
    "WebConfig",
    "control_socket",
    "find",
    "load",
    "parse_network",
    "published",
    "validate",
]
