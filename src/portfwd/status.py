"""Typed status: the frozen rows that `portfwd status`, `/metrics` and the control socket all read.

state.py builds a `Snapshot` from its live counters. Its JSON form (`Snapshot.to_json`) is the
one serialisation: what the control socket sends and what `portfwd status --json` prints. The
CLI reads it back with `Snapshot.from_json`, which checks the schema version and the type of
every value, so a view never meets a missing key, a string where a number goes, or a newer
instance whose rows mean something else.

Schema versions. `SCHEMA` is the `schema` key of every snapshot. It goes up when a key is
removed or renamed, or a value changes its type or meaning. Adding a key does not bump it: a
new field gets a default (so a reader meets older snapshots with it missing), and readers
ignore keys they do not know (so an older reader meets newer snapshots).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

from portfwd.errors import RuntimeFailure

#: The status schema this portfwd writes and reads (see the module docstring for what bumps it).
SCHEMA = 1

Row = TypeVar("Row")


class StatusError(RuntimeFailure):
    """A status snapshot that cannot be read: another schema version, or not portfwd's shape."""


@dataclass(frozen=True, slots=True)
class BackendRow:
    """One backend of a rule with several (or with health checks): its health and counters.

    `state` is `up` or `down`; `since` (wall-clock) when it last changed, `why` what took it
    down. `last_check` is the wall-clock time of the last active check (0: none yet) and
    `last_check_result` its outcome (`ok in 1.2 ms`, `refused`, `timeout`, `no "OK" in the answer`).
    Bytes include live sessions.
    """

    name: str
    target: str
    weight: int
    backup: bool
    state: str
    since: float
    why: str
    sessions_active: int
    sessions_total: int
    bytes_up: int
    bytes_down: int
    failures: int
    last_check: float
    last_check_result: str


@dataclass(frozen=True, slots=True)
class RuleRow:
    """One rule: what it forwards and its counters, bytes including live sessions."""

    name: str
    listen: str
    connect: str
    protocol: str
    relay: str
    running: bool
    connections_total: int
    connections_active: int
    bytes_up: int
    bytes_down: int
    denied_total: int
    errors: dict[str, int]
    udp_flows_active: int
    #: Upstream connect times per bucket (counters.CONNECT_BUCKETS, then +Inf); not cumulative.
    connect_buckets: tuple[int, ...] = ()
    connect_seconds_sum: float = 0.0
    #: Bytes per second each way over the last sample interval (about a second).
    rate_up: float = 0.0
    rate_down: float = 0.0
    #: The balancing method and the backends, for a rule with several (else empty).
    balance: str = ""
    backends: tuple[BackendRow, ...] = ()
    #: "" while it accepts; "paused" (new clients wait in the backlog) or "draining" (new
    #: clients refused, live sessions go on), as set through the web API.
    mode: str = ""


@dataclass(frozen=True, slots=True)
class Listener:
    """One bound socket (or port range) of a rule, and the relay path its sessions take."""

    rule: str
    address: str
    protocol: str
    path: str


@dataclass(frozen=True, slots=True)
class ListeningSocket:
    """One socket portfwd listens on, as `ss -l` lists it: a row per socket, so a port range,
    a tcp+udp rule and both halves of a tunnel's `-L localhost:port` each have several.

    `owner` is what it serves (a rule, a tunnel forward `edge -L 127.0.0.1:8080 -> web:80`,
    `metrics`, `control`), `kind` which of those it is (rule, tunnel, metrics, control),
    `protocol` tcp, udp or unix, `address` the address it is bound to (`127.0.0.1:8080`,
    `[::1]:8080`, a Unix path) and `path` the relay path of its sessions.
    """

    owner: str
    kind: str
    protocol: str
    address: str
    path: str


@dataclass(frozen=True, slots=True)
class SessionRow:
    """One live relayed session: `started` is wall-clock, `age` and `idle` are seconds."""

    id: int
    rule: str
    client: str
    target: str
    path: str
    started: float
    age: float
    idle: float
    bytes_up: int
    bytes_down: int
    #: Bytes per second each way over the last sample interval (about a second).
    rate_up: float = 0.0
    rate_down: float = 0.0
    #: The local address of portfwd's upstream socket (`127.0.0.1:41000`), "" where the relay
    #: does not tell it (only the splice relay does, so far).
    upstream_local: str = ""
    #: The process relaying it (a worker's pid with `workers`; 0 in snapshots that predate it).
    pid: int = 0


@dataclass(frozen=True, slots=True)
class ClosedRow:
    """One recently closed session (the last few per rule, tunnel forward and server).

    `started` and `ended` are wall-clock, `duration` seconds; `reason` is why it closed, as
    its log line says it (`client closed`, `upstream reset`, `idle timeout`, `shutdown`, ...).
    """

    rule: str
    client: str
    target: str
    path: str
    started: float
    ended: float
    duration: float
    bytes_up: int
    bytes_down: int
    reason: str


@dataclass(frozen=True, slots=True)
class ForwardRow:
    """One -L/-R/-D forward of a tunnel, with its counters (bytes including live sessions)."""

    spec: str
    kind: str
    listen: str
    target: str
    state: str
    error: str
    connections_total: int
    connections_active: int
    bytes_up: int
    bytes_down: int
    errors: dict[str, int]
    rate_up: float = 0.0
    rate_down: float = 0.0


@dataclass(frozen=True, slots=True)
class TunnelRow:
    """One SSH tunnel: its state since when (wall-clock), reconnects, last error, forwards."""

    name: str
    server: str
    state: str
    since: float
    reconnects: int
    last_error: str
    forwards: tuple[ForwardRow, ...]
    #: The SSH connection's own socket while it is up (`127.0.0.1:40312`, `[::1]:22`), else "".
    local: str = ""
    peer: str = ""


@dataclass(frozen=True, slots=True)
class ServerSessionRow:
    """One client logged in to `portfwd server`, with the forwards it asked for and its bytes."""

    user: str
    source: str
    fingerprint: str
    since: float
    forwards: tuple[str, ...]
    connections_total: int
    connections_active: int
    bytes_up: int
    bytes_down: int
    rate_up: float = 0.0
    rate_down: float = 0.0


@dataclass(frozen=True, slots=True)
class GatewayRuleRow:
    """Packets and bytes of one commented rule in portfwd's nftables table."""

    chain: str
    rule: str
    packets: int
    bytes: int


@dataclass(frozen=True, slots=True)
class TriggerRow:
    """One port trigger: the ports it opens, the LAN host holding it ("" for none), seconds left."""

    trigger: str
    open: str
    host: str
    expires: int


@dataclass(frozen=True, slots=True)
class GatewaySessionRow:
    """One DNATed flow seen through conntrack; `age` in seconds when conntrack stamps it."""

    rule: str
    proto: str
    client: str
    public_port: int
    target: str
    state: str
    age: int | None


@dataclass(frozen=True, slots=True)
class MappingRow:
    """One router mapping portfwd keeps: its state, where it is published, its lease (wall-clock)."""

    name: str
    method: str
    protocol: str
    internal: str
    external: str
    state: str
    lease: int
    expires: float | None
    renewals: int
    recreated: int
    last_error: str
    since: float


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One worker process (`workers = N`): its number, pid, since when (wall-clock), how often
    it was started again after it died, and how the last one ended (`killed by SIGKILL`)."""

    index: int
    pid: int
    state: str
    started: float
    restarts: int
    last_exit: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one instance runs, at one moment: the header, then one tuple per part."""

    pid: int
    started: float
    config: str | None
    instance: str
    kind: str
    control: str
    rules: tuple[RuleRow, ...] = ()
    listeners: tuple[Listener, ...] = ()
    sessions: tuple[SessionRow, ...] = ()
    tunnels: tuple[TunnelRow, ...] = ()
    server_sessions: tuple[ServerSessionRow, ...] = ()
    gateway_rules: tuple[GatewayRuleRow, ...] = ()
    triggers: tuple[TriggerRow, ...] = ()
    gateway_sessions: tuple[GatewaySessionRow, ...] = ()
    mappings: tuple[MappingRow, ...] = ()
    server_auth_failures: int = 0
    #: Live flows of the kernel relays (`relay = "kernel"`), from conntrack; `public_port` is
    #: the rule's listen port the client asked for.
    kernel_sessions: tuple[GatewaySessionRow, ...] = ()
    #: With `[gateway.ha]`: this router's VRRP role (master, backup, fault, starting); "" without.
    gateway_role: str = ""
    #: Every listening socket, one row each (`listeners` has one row per rule).
    listening: tuple[ListeningSocket, ...] = ()
    #: Recently closed sessions: per rule (in config order), tunnel forward and server, newest first.
    closed: tuple[ClosedRow, ...] = ()
    #: The worker processes beside this one (`workers = N`; empty with one process).
    workers: tuple[WorkerRow, ...] = ()
    schema: int = field(default=SCHEMA)

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready form: one object per row, lists for tuples, the field names as keys."""
        encoded: dict[str, Any] = _encode(self)
        return {"schema": encoded.pop("schema"), **encoded}  # first, for whoever reads it raw

    @classmethod
    def from_json(cls, data: object) -> Self:
        """Read a snapshot from its JSON form (as `json.loads` returns it).

        Raises StatusError, one line: the schema version is not `SCHEMA`, or a value is missing
        or of the wrong type (named by its path, `status.rules[0].bytes_up`).
        """
        if not isinstance(data, dict):
            raise StatusError(f"expected an object, got {_kind(data)}", field="status")
        schema = data.get("schema", 0)
        if type(schema) is not int or schema != SCHEMA:  # not isinstance: True == 1
            spoken = schema if type(schema) is int else "?"
            raise StatusError(
                f"the instance speaks status schema {spoken}; this portfwd reads {SCHEMA}",
                hint="use the same portfwd version for both",
            )
        return _row(cls, data, "status")


# -- the codec: dataclass fields and their annotations drive both directions ------------------

_NAMES: dict[type, tuple[str, ...]] = {}
_HINTS: dict[type, dict[str, Any]] = {}


def _encode(value: object) -> Any:
    if isinstance(value, str | int | float | None):
        return value
    if isinstance(value, tuple | list):
        return [_encode(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _encode(item) for key, item in value.items()}
    kind = type(value)
    names = _NAMES.get(kind)
    if names is None:
        names = _NAMES[kind] = tuple(item.name for item in dataclasses.fields(value))  # type: ignore[arg-type]
    return {name: _encode(getattr(value, name)) for name in names}


def _kind(value: object) -> str:
    """What a JSON value is, in words (never the value itself: it may be long or unprintable)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _row(cls: type[Row], data: object, where: str) -> Row:
    if not isinstance(data, dict):
        raise StatusError(f"expected an object, got {_kind(data)}", field=where)
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for item in dataclasses.fields(cls):  # type: ignore[arg-type]
        if item.name in data:
            values[item.name] = _value(hints[item.name], data[item.name], f"{where}.{item.name}")
        elif item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            raise StatusError(f"{item.name!r} is missing", field=where)
    return cls(**values)


def _value(kind: Any, value: object, where: str) -> Any:
    """`value` checked (and converted: lists to tuples, ints to floats) against annotation `kind`."""
    if kind is str or kind is bool:
        if isinstance(value, kind):
            return value
        raise StatusError(
            f"expected {'a string' if kind is str else 'a boolean'}, got {_kind(value)}", field=where
        )
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise StatusError(f"expected an integer, got {_kind(value)}", field=where)
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise StatusError(f"expected a finite number, got {_kind(value)}", field=where)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is types.UnionType or origin is typing.Union:
        if value is None and type(None) in args:
            return None
        (other,) = (arg for arg in args if arg is not type(None))
        return _value(other, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise StatusError(f"expected a list, got {_kind(value)}", field=where)
        return tuple(_value(args[0], item, f"{where}[{index}]") for index, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise StatusError(f"expected an object, got {_kind(value)}", field=where)
        # The keys are the peer's text: the path names the object, never a key.
        return {str(key): _value(args[1], item, f"{where}[*]") for key, item in value.items()}
    return _row(kind, value, where)
