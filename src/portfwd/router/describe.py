"""Router mappings as `portfwd check` shows them: one plain line per mapping, from the specs."""

from __future__ import annotations

from portfwd.specs import MapSpec


def map_lines(maps: tuple[MapSpec, ...]) -> list[str]:
    """What each mapping will ask of which router, and for how long."""
    lines = []
    for entry in maps:
        external = entry.external or "any"
        where = entry.upnp_url or (
            f"router {entry.gateway}" if entry.gateway else "the default route's router"
        )
        lines.append(
            f"{entry.name}: ask {where} for external port {external}/{entry.protocol} -> "
            f"this host's {entry.port} via {entry.method}, lease {entry.lease:g} s, renewed at half"
        )
    return lines
