"""SSH tunnels and the tunnel server as `portfwd check` shows them: plain rows and lines from the specs.

The CLI draws them (a table, a line); this module only says what each part will do, so the SSH
layer that runs a tunnel is the one that explains it. No asyncssh here: `check` stays quick.
"""

from __future__ import annotations

from portfwd.specs import ServerSpec, TunnelSpec

#: The columns of `tunnel_rows`.
TUNNEL_COLUMNS = ("tunnel", "server", "forwards", "host keys", "keepalive")


def tunnel_rows(tunnels: tuple[TunnelSpec, ...]) -> list[tuple[str, str, str, str, str]]:
    """One row per tunnel: name, server (and jump hosts), forwards one a line, host keys, keepalive."""
    rows: list[tuple[str, str, str, str, str]] = []
    for tunnel in tunnels:
        via = f" via {', '.join(tunnel.jump)}" if tunnel.jump else ""
        keepalive = "off"
        if tunnel.keepalive_interval:
            keepalive = f"{tunnel.keepalive_interval:g}s x {tunnel.keepalive_count}"
        rows.append(
            (
                tunnel.label,
                tunnel.ssh + via,
                "\n".join(str(forward) for forward in tunnel.forwards),
                f"{tunnel.strict_host_key_checking}: {', '.join(tunnel.known_hosts)}",
                keepalive,
            )
        )
    return rows


def server_line(server: ServerSpec) -> str:
    """The tunnel server in one line: where it listens, its host key, and what each user may do."""
    users = ", ".join(
        f"{user.name} (open {', '.join(user.permit_open) or 'nothing'}; "
        f"listen {', '.join(user.permit_listen) or 'nothing'})"
        for user in server.users
    )
    return (
        f"server: ssh on {server.listen}, host key {server.host_key}, "
        f"gateway_ports {'on' if server.gateway_ports else 'off'}; users: {users}"
    )
