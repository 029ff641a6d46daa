"""What `portfwd status` draws: rich renderables built from typed status snapshots, and nothing else.

Apart from commands.py so that the command line stays parsing and dispatch. Every string in a
snapshot may quote a peer (a SOCKS name, a user, a router's description); `printable_snapshot`
reads the instance's JSON into `status.Snapshot` with all of them escaped before anything here
renders them, and the console renders without markup. Rows keep the snapshot's order, which
is the config's.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from portfwd.printable import printable_values
from portfwd.status import GatewaySessionRow, Snapshot, TunnelRow

if TYPE_CHECKING:
    from rich.console import Console, Group, RenderableType
    from rich.table import Table

#: The width a console has when stdout is not a terminal: wider than any line, so that
#: `status | cat` and `check | cat` print every value whole (a table is as wide as it needs).
PIPED_WIDTH = 1_000_000


def console() -> Console:
    """The console `status` and `check` print to: plain (snapshots quote peers; nothing is
    markup), as wide as the terminal, and when piped as wide as each line needs."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console(markup=False, emoji=False, highlight=False)
    return Console(markup=False, emoji=False, highlight=False, width=PIPED_WIDTH)


def _bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"  # pragma: no cover - the loop always returns


def _rate(per_second: float) -> str:
    """Bytes per second as `12.0 KiB/s`; `-` for nothing moving."""
    return f"{_bytes(round(per_second))}/s" if per_second >= 0.5 else "-"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def status_view(status: Snapshot) -> Group:
    """The netstat-like picture of one snapshot: a header, rules, then live sessions."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    who = f"{status.instance} ({status.kind}), " if status.instance else ""
    header = Text(
        f"portfwd {who}pid {status.pid}, up {_age(time.time() - status.started)}, "
        f"config {status.config or '(none)'}"
    )
    parts: list[RenderableType] = [header]
    if status.rules or not (
        status.tunnels or status.server_sessions or status.gateway_rules or status.mappings
    ):
        parts.append(_rules(status))
    if status.tunnels:
        parts.append(tunnel_view(status.tunnels))
    if status.gateway_rules:
        title = "gateway (table inet portfwd)" + (
            f", HA role {status.gateway_role}" if status.gateway_role else ""
        )
        gateway = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("chain", "rule", "packets", "bytes"):
            gateway.add_column(column)
        for row in status.gateway_rules:
            gateway.add_row(row.chain, row.rule or "-", str(row.packets), _bytes(row.bytes))
        parts.append(gateway)
    if status.mappings:
        parts.append(_mappings(status))
    if status.gateway_sessions:
        parts.append(
            _nat_flows(
                "gateway NAT sessions (conntrack)", ("public port", "LAN target"), status.gateway_sessions
            )
        )
    if status.kernel_sessions:
        parts.append(_nat_flows("kernel relay flows (conntrack)", ("port", "target"), status.kernel_sessions))
    if status.triggers:
        triggers = Table(title="port triggers", title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("trigger", "opens", "held by", "time left"):
            triggers.add_column(column)
        for trigger in status.triggers:
            held = bool(trigger.host)
            triggers.add_row(
                trigger.trigger, trigger.open, trigger.host or "-", _age(trigger.expires) if held else "-"
            )
        parts.append(triggers)
    if status.server_sessions:
        parts.append(_server_sessions(status))
    if status.listening:
        parts.append(_listening(status))
    parts.append(_sessions(status) if status.sessions else Text("no live sessions"))
    if status.closed:
        parts.append(_closed(status))
    return Group(*parts)


def _listening(status: Snapshot) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(title="listening sockets", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("socket", "proto", "serves", "path"):
        table.add_column(column)
    for item in status.listening:
        table.add_row(item.address or "-", item.protocol, item.owner, item.path)
    return table


def _closed(status: Snapshot) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(title="recently closed", title_justify="left", box=box.SIMPLE_HEAD)
    for column, justify in (
        ("rule", "left"),
        ("client", "left"),
        ("target", "left"),
        ("path", "left"),
        ("up", "right"),
        ("down", "right"),
        ("lasted", "right"),
        ("closed", "right"),
        ("why", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    now = time.time()
    for item in status.closed:
        table.add_row(
            item.rule,
            item.client,
            item.target,
            item.path,
            _bytes(item.bytes_up),
            _bytes(item.bytes_down),
            _duration(item.duration),
            f"{_age(now - item.ended)} ago",
            item.reason,
        )
    return table


def _duration(seconds: float) -> str:
    """Short durations to the millisecond (`0.004s`), longer ones as ages (`2m05s`)."""
    return f"{seconds:.3f}s" if seconds < 10 else _age(seconds)


def _rules(status: Snapshot) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(title="rules", title_justify="left", box=box.SIMPLE_HEAD)
    for column, justify in (
        ("rule", "left"),
        ("listen", "left"),
        ("connect", "left"),
        ("proto", "left"),
        ("relay", "left"),
        ("active", "right"),
        ("total", "right"),
        ("up", "right"),
        ("down", "right"),
        ("up/s", "right"),
        ("down/s", "right"),
        ("errors", "left"),
    ):
        table.add_column(column, justify=justify, no_wrap=column in ("rule", "listen", "connect"))  # type: ignore[arg-type]
    for rule in status.rules:
        errors = dict(rule.errors)
        if rule.denied_total:
            errors["denied"] = rule.denied_total
        table.add_row(
            rule.name + ("" if rule.running else " (removed)") + (f" ({rule.mode})" if rule.mode else ""),
            rule.listen,
            rule.connect,
            rule.protocol,
            rule.relay,
            str(rule.connections_active),
            str(rule.connections_total),
            _bytes(rule.bytes_up),
            _bytes(rule.bytes_down),
            _rate(rule.rate_up),
            _rate(rule.rate_down),
            ", ".join(f"{key} {value}" for key, value in sorted(errors.items())) or "-",
        )
        for backend in rule.backends:
            notes = [f"{backend.failures} failed connects"] if backend.failures else []
            if backend.why:
                notes.append(backend.why)
            if backend.last_check:
                ago = _age(max(0.0, time.time() - backend.last_check))
                notes.append(f"check {ago} ago: {backend.last_check_result}")
            table.add_row(
                f"  {backend.name}",
                backend.state + (" (backup)" if backend.backup else ""),
                backend.target,
                "",
                f"weight {backend.weight}",
                str(backend.sessions_active),
                str(backend.sessions_total),
                _bytes(backend.bytes_up),
                _bytes(backend.bytes_down),
                "",
                "",
                "; ".join(notes) or "-",
            )
    return table


def _sessions(status: Snapshot) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(title="sessions", title_justify="left", box=box.SIMPLE_HEAD)
    for column, justify in (
        ("rule", "left"),
        ("client", "left"),
        ("target", "left"),
        ("via", "left"),
        ("path", "left"),
        ("up", "right"),
        ("down", "right"),
        ("up/s", "right"),
        ("down/s", "right"),
        ("age", "right"),
        ("idle", "right"),
    ):
        table.add_column(column, justify=justify, no_wrap=column in ("client", "target", "via"))  # type: ignore[arg-type]
    order = {rule.name: index for index, rule in enumerate(status.rules)}  # config order, then the rest
    for item in sorted(status.sessions, key=lambda entry: (order.get(entry.rule, len(order)), -entry.age)):
        table.add_row(
            item.rule,
            item.client,
            item.target,
            item.upstream_local or "-",
            item.path,
            _bytes(item.bytes_up),
            _bytes(item.bytes_down),
            _rate(item.rate_up),
            _rate(item.rate_down),
            _age(item.age),
            _age(item.idle),
        )
    return table


def _mappings(status: Snapshot) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(title="router mappings", title_justify="left", box=box.SIMPLE_HEAD)
    for column in (
        "mapping",
        "method",
        "state",
        "internal",
        "external",
        "lease left",
        "renewals",
        "last error",
    ):
        table.add_column(column)
    for row in status.mappings:
        left = "permanent" if row.state == "up" and not row.expires else "-"
        if row.expires:
            left = _age(row.expires - time.time())
        table.add_row(
            f"{row.name} {row.protocol}",
            row.method,
            row.state,
            row.internal,
            row.external or "-",
            left,
            str(row.renewals),
            row.last_error or "-",
        )
    return table


def _server_sessions(status: Snapshot) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(title="server sessions", title_justify="left", box=box.SIMPLE_HEAD)
    for column in (
        "user",
        "source",
        "key",
        "forwards",
        "active",
        "total",
        "up",
        "down",
        "up/s",
        "down/s",
        "age",
    ):
        table.add_column(column)
    for item in status.server_sessions:
        table.add_row(
            item.user,
            item.source,
            item.fingerprint,
            ", ".join(item.forwards) or "-",
            str(item.connections_active),
            str(item.connections_total),
            _bytes(item.bytes_up),
            _bytes(item.bytes_down),
            _rate(item.rate_up),
            _rate(item.rate_down),
            _age(time.time() - item.since),
        )
    return table


def tunnel_view(tunnels: tuple[TunnelRow, ...]) -> Table:
    """One row per tunnel (state, since, reconnects, last error), then one per forward."""
    from rich import box
    from rich.table import Table

    table = Table(title="tunnels", title_justify="left", box=box.SIMPLE_HEAD)
    for column, justify in (
        ("tunnel / forward", "left"),
        ("listen", "left"),
        ("target", "left"),
        ("state", "left"),
        ("active", "right"),
        ("total", "right"),
        ("up", "right"),
        ("down", "right"),
        ("up/s", "right"),
        ("down/s", "right"),
        ("note", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    now = time.time()
    for tunnel in tunnels:
        note = f"{tunnel.reconnects} reconnects"
        if tunnel.last_error:
            note += f"; last error: {tunnel.last_error}"
        link = f"{tunnel.local} -> {tunnel.peer}" if tunnel.local else ""
        table.add_row(
            tunnel.name,
            tunnel.server,
            link,
            f"{tunnel.state} {_age(now - tunnel.since)}",
            "",
            "",
            "",
            "",
            "",
            "",
            note,
        )
        for forward in tunnel.forwards:
            errors = ", ".join(f"{key} {value}" for key, value in sorted(forward.errors.items()))
            table.add_row(
                f"  {(forward.spec.split() or [''])[0]}",
                forward.listen,
                forward.target,
                forward.state,
                str(forward.connections_active),
                str(forward.connections_total),
                _bytes(forward.bytes_up),
                _bytes(forward.bytes_down),
                _rate(forward.rate_up),
                _rate(forward.rate_down),
                "; ".join(item for item in (forward.error, errors) if item) or "-",
            )
    return table


def printable_snapshot(data: dict[str, Any]) -> Snapshot:
    """Read an instance's JSON snapshot with every string escaped for the terminal.

    Raises StatusError (one line) for another schema version or a malformed snapshot.
    """
    return Snapshot.from_json(printable_values(data))


def instances_view(snapshots: list[Snapshot]) -> Table:
    """One row per running instance, for `status` with nothing naming one."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"{len(snapshots)} running instance(s)", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("name", "kind", "pid", "up", "config", "rules", "tunnels", "sessions", "control"):
        table.add_column(
            column, justify="right" if column in ("pid", "rules", "tunnels", "sessions") else "left"
        )
    now = time.time()
    for snapshot in snapshots:
        table.add_row(
            snapshot.instance or "?",
            snapshot.kind or "?",
            str(snapshot.pid),
            _age(now - snapshot.started),
            snapshot.config or "-",
            str(len(snapshot.rules)),
            str(len(snapshot.tunnels)),
            str(len(snapshot.sessions) + len(snapshot.server_sessions)),
            snapshot.control or "-",
        )
    return table


def _nat_flows(title: str, names: tuple[str, str], flows: tuple[GatewaySessionRow, ...]) -> Table:
    """Flows the kernel translates, as conntrack lists them (the gateway's or the kernel relays')."""
    from rich import box
    from rich.table import Table

    nat = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("rule", "proto", "client", *names, "state", "age"):
        nat.add_column(column)
    for flow in flows:
        nat.add_row(
            flow.rule,
            flow.proto,
            flow.client,
            str(flow.public_port),
            flow.target,
            flow.state or "-",
            "-" if flow.age is None else _age(flow.age),
        )
    return nat
