"""What `portfwd status` draws: rich renderables built from status snapshots, and nothing else.

Apart from commands.py so that the command line stays parsing and dispatch. Every value in a
snapshot may quote a peer (a SOCKS name, a user, a router's description); `printable_snapshot`
escapes them all before anything here renders them, and the console renders without markup.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from portfwd.printable import printable_values

if TYPE_CHECKING:
    from rich.console import Group
    from rich.table import Table


def _bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"  # pragma: no cover - the loop always returns


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def status_view(status: dict[str, Any]) -> Group:
    """The netstat-like picture of one snapshot: a header, rules, then live sessions."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    uptime = time.time() - float(status.get("started", time.time()))
    who = f"{status.get('instance')} ({status.get('kind')}), " if status.get("instance") else ""
    header = Text(
        f"portfwd {who}pid {status.get('pid')}, up {_age(uptime)}, config {status.get('config') or '(none)'}"
    )
    rules = Table(title="rules", title_justify="left", box=box.SIMPLE_HEAD)
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
        ("errors", "left"),
    ):
        rules.add_column(column, justify=justify, no_wrap=column in ("rule", "listen", "connect"))  # type: ignore[arg-type]
    for rule in sorted(status.get("rules", []), key=lambda item: str(item["name"])):
        errors = dict(rule.get("errors", {}))
        if rule.get("denied_total"):
            errors["denied"] = rule["denied_total"]
        name = rule["name"] + ("" if rule.get("running", True) else " (removed)")
        rules.add_row(
            name,
            rule["listen"],
            rule["connect"],
            rule["protocol"],
            rule["relay"],
            str(rule["connections_active"]),
            str(rule["connections_total"]),
            _bytes(rule["bytes_up"]),
            _bytes(rule["bytes_down"]),
            ", ".join(f"{key} {value}" for key, value in sorted(errors.items())) or "-",
        )
    sessions = Table(title="sessions", title_justify="left", box=box.SIMPLE_HEAD)
    for column, justify in (
        ("rule", "left"),
        ("client", "left"),
        ("target", "left"),
        ("path", "left"),
        ("up", "right"),
        ("down", "right"),
        ("age", "right"),
        ("idle", "right"),
    ):
        sessions.add_column(column, justify=justify, no_wrap=column in ("client", "target"))  # type: ignore[arg-type]
    for item in sorted(
        status.get("sessions", []), key=lambda entry: (str(entry["rule"]), -float(entry["age"]))
    ):
        sessions.add_row(
            item["rule"],
            item["client"],
            item["target"],
            item["path"],
            _bytes(item["bytes_up"]),
            _bytes(item["bytes_down"]),
            _age(item["age"]),
            _age(item["idle"]),
        )
    parts: list[Any] = [header]
    if status.get("rules") or not (
        status.get("tunnels")
        or status.get("server_sessions")
        or status.get("gateway_rules")
        or status.get("mappings")
    ):
        parts.append(rules)
    if status.get("tunnels"):
        parts.append(tunnel_view(status["tunnels"]))
    if status.get("gateway_rules"):
        rules_table = Table(title="gateway (table inet portfwd)", title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("chain", "rule", "packets", "bytes"):
            rules_table.add_column(column)
        for row in status["gateway_rules"]:
            rules_table.add_row(row["chain"], row["rule"] or "-", str(row["packets"]), _bytes(row["bytes"]))
        parts.append(rules_table)
    if status.get("mappings"):
        mappings = Table(title="router mappings", title_justify="left", box=box.SIMPLE_HEAD)
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
            mappings.add_column(column)
        for row in status["mappings"]:
            expires = row.get("expires")
            left = "permanent" if row["state"] == "up" and not expires else "-"
            if expires:
                left = _age(float(expires) - time.time())
            mappings.add_row(
                f"{row['name']} {row['protocol']}",
                row["method"],
                row["state"],
                row["internal"],
                row["external"] or "-",
                left,
                str(row["renewals"]),
                row["last_error"] or "-",
            )
        parts.append(mappings)
    if status.get("gateway_sessions"):
        nat = Table(title="gateway NAT sessions (conntrack)", title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("rule", "proto", "client", "public port", "LAN target", "state", "age"):
            nat.add_column(column)
        for row in status["gateway_sessions"]:
            nat.add_row(
                row["rule"],
                row["proto"],
                row["client"],
                str(row["public_port"]),
                row["target"],
                row["state"] or "-",
                "-" if row["age"] is None else _age(row["age"]),
            )
        parts.append(nat)
    if status.get("triggers"):
        triggers = Table(title="port triggers", title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("trigger", "opens", "held by", "time left"):
            triggers.add_column(column)
        for row in status["triggers"]:
            held = bool(row.get("host"))
            triggers.add_row(
                row["trigger"], row["open"], row["host"] or "-", _age(row["expires"]) if held else "-"
            )
        parts.append(triggers)
    if status.get("server_sessions"):
        clients = Table(title="server sessions", title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("user", "source", "key", "forwards", "active", "total", "up", "down", "age"):
            clients.add_column(column)
        for item in status["server_sessions"]:
            clients.add_row(
                item["user"],
                item["source"],
                item["fingerprint"],
                ", ".join(item["forwards"]) or "-",
                str(item["connections_active"]),
                str(item["connections_total"]),
                _bytes(item["bytes_up"]),
                _bytes(item["bytes_down"]),
                _age(time.time() - float(item["since"])),
            )
        parts.append(clients)
    parts.append(sessions if status.get("sessions") else Text("no live sessions"))
    return Group(*parts)


def tunnel_view(tunnels: list[dict[str, Any]]) -> Table:
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
        ("note", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    now = time.time()
    for tunnel in tunnels:
        note = f"{tunnel['reconnects']} reconnects"
        if tunnel.get("last_error"):
            note += f"; last error: {tunnel['last_error']}"
        table.add_row(
            f"{tunnel['name']}",
            tunnel["server"],
            "",
            f"{tunnel['state']} {_age(now - float(tunnel['since']))}",
            "",
            "",
            "",
            "",
            note,
        )
        for forward in tunnel["forwards"]:
            errors = ", ".join(f"{key} {value}" for key, value in sorted(forward["errors"].items()))
            table.add_row(
                f"  {forward['spec'].split()[0]}",
                forward["listen"],
                forward["target"],
                forward["state"],
                str(forward["connections_active"]),
                str(forward["connections_total"]),
                _bytes(forward["bytes_up"]),
                _bytes(forward["bytes_down"]),
                "; ".join(item for item in (forward.get("error", ""), errors) if item) or "-",
            )
    return table


def printable_snapshot(snapshot: dict[str, Any]) -> dict[str, Any]:
    cleaned: dict[str, Any] = printable_values(snapshot)  # type: ignore[assignment]
    return cleaned


def instances_view(snapshots: list[dict[str, Any]]) -> Table:
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
            str(snapshot.get("instance") or "?"),
            str(snapshot.get("kind") or "?"),
            str(snapshot.get("pid")),
            _age(now - float(snapshot.get("started", now))),
            str(snapshot.get("config") or "-"),
            str(len(snapshot.get("rules", []))),
            str(len(snapshot.get("tunnels", []))),
            str(len(snapshot.get("sessions", [])) + len(snapshot.get("server_sessions", []))),
            str(snapshot.get("control") or "-"),
        )
    return table
