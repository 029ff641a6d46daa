"""The tunnel server's forwarding policy: which targets and listen addresses a user may name.

Pure functions over the config's `permit_open`/`permit_listen` entries and a key's
authorized_keys options, so that each rule is tested on its own; only `linked` asks the file
system (a path that leads through a symbolic link is never one the admin permitted).
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

NOT_PLAIN = "not a plain absolute path ('..', '.' and empty components are refused)"
LINKED = "the path goes through a symbolic link; use the real path (a link could lead anywhere)"


def permits(rules: tuple[str, ...] | list[str], host: str, port: int) -> bool:
    """Does `host:port` match one of `host:port`, `*:port`, `host:*`, `any`?"""
    for rule in rules:
        if rule == "any":
            return True
        rule_host, _, rule_port = rule.rpartition(":")
        rule_host = rule_host.strip("[]")
        if rule_port not in ("*", str(port)):
            continue
        if rule_host in ("*", host):
            return True
    return False


def plain_path(path: str) -> bool:
    """Is `path` absolute and already normal: no `..` or `.` component, no `//`, no NUL?

    The server may run as root and binds or connects whatever path the client names; a path
    that only looks like it is under a permitted directory (`/srv/pub/../secret/x.sock`) must
    never match, so anything but the one plain spelling of a path is refused outright.
    """
    if not path.startswith("/") or "\0" in path:
        return False
    parts = path[1:].split("/")
    return all(part not in ("", ".", "..") for part in parts)


def linked(path: str) -> bool:
    """Does `path` (plain) pass through a symbolic link, the last component included?

    connect(2) and bind(2) follow links, so `/srv/pub/x.sock -> /var/run/docker.sock`, made by
    anyone who may write in /srv/pub, would otherwise match `unix:/srv/pub/*.sock`.
    """
    return os.path.realpath(path) != path


def path_permitted(rules: tuple[str, ...], path: str) -> bool:
    """Does a Unix socket path match a `unix:/path` entry (shell wildcards within one component)?

    Matched component by component, so a `*` never crosses a `/` (`/srv/pub/*.sock` does not
    admit `/srv/pub/sub/x.sock`), and only plain paths (see `plain_path`) match at all.
    "any" does not cover paths: the server may run as root, and a socket path reaches local
    services (a container runtime's socket, say) that host:port rules were never meant to open.
    """
    if not plain_path(path):
        return False
    parts = path.split("/")
    for rule in rules:
        if not rule.startswith("unix:"):
            continue
        pattern = rule[5:].split("/")
        if len(pattern) == len(parts) and all(map(fnmatch.fnmatchcase, parts, pattern)):
            return True
    return False


def forwarding_allowed(options: dict[str, Any]) -> bool:
    """authorized_keys: `no-port-forwarding`, or `restrict` without `port-forwarding`, forbid it."""
    if options.get("no-port-forwarding"):
        return False
    return not (options.get("restrict") and not options.get("port-forwarding"))
