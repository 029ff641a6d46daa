"""Who may do what through `[web]`: the bearer token, the request's Origin and Host. Pure.

Why these three. Actions need `Authorization: Bearer TOKEN` (never a cookie, so a page on
another site cannot borrow the user's browser to send one). A request a browser marks as
coming from another site (`Sec-Fetch-Site`, else an `Origin` that is not this server) is
refused outright, reads included. And the `Host` must name this server by address, as
`localhost` or as a name listed in `[web] hosts`: a page on a DNS name that an attacker
re-points at this server's address (DNS rebinding) gets nothing, not even the open reads.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from portfwd.printable import printable

#: HTTP statuses the guard answers with.
UNAUTHORIZED = 401
FORBIDDEN = 403


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused: the HTTP status and one line for the client."""

    status: int
    message: str


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header; None when there is none."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authorize(token: str | None, sent: str | None, *, needed: bool) -> Refusal | None:
    """Whether a request that sent `sent` (its bearer token) may go on when the instance's token
    is `token` (None: it has none) and the endpoint `needed` one. Constant-time comparison."""
    if not needed:
        return None
    if token is None:
        return Refusal(
            FORBIDDEN, "this instance has no [web] token, so actions are off; set web.token_file and reload"
        )
    if sent is None:
        return Refusal(UNAUTHORIZED, "this needs the [web] token: send Authorization: Bearer TOKEN")
    if not hmac.compare_digest(sent.encode("utf-8", "surrogateescape"), token.encode()):
        return Refusal(UNAUTHORIZED, "wrong token: send the one in the instance's [web] token_file")
    return None


def same_origin(
    origin: str | None, fetch_site: str | None, host: str | None, forwarded: str | None
) -> Refusal | None:
    """Refuse a request a browser sent from another site: `Sec-Fetch-Site` says so, or an
    `Origin` whose host:port is neither `Host` nor (behind a reverse proxy) `X-Forwarded-Host`."""
    if fetch_site is not None and fetch_site.strip().lower() in ("cross-site", "same-site"):
        return Refusal(
            FORBIDDEN, "cross-site request refused: use the dashboard on this server, or no Origin"
        )
    if origin is None:
        return None
    origin = origin.strip()
    try:
        parts = urlsplit(origin)
        netloc, scheme = parts.netloc.lower(), parts.scheme
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        netloc, scheme = "", ""
    if scheme in ("http", "https") and netloc:
        wanted = _with_port(netloc, scheme)
        # A Host without a port means the scheme's own (nginx's `$host` behind HTTPS: 443).
        if any(_with_port(value.strip().lower(), scheme) == wanted for value in (host, forwarded) if value):
            return None
    return Refusal(FORBIDDEN, f"request from origin {printable(origin[:100])!r} refused: not this server")


def _with_port(netloc: str, scheme: str) -> str:
    """host:port with the scheme's port spelled out, so `h` and `h:80` compare equal."""
    if netloc.endswith("]") or ":" not in netloc:
        return f"{netloc}:{443 if scheme == 'https' else 80}"
    return netloc


def known_host(host: str | None, names: frozenset[str]) -> Refusal | None:
    """The Host header must be an IP address, `localhost`, or one of `names` ([web] hosts): a
    page on a DNS name an attacker re-points at this server (DNS rebinding) gets nothing."""
    if host is None:
        return Refusal(FORBIDDEN, "no Host header; send one")
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    name = name.rstrip(".")
    if name == "localhost" or name in names:
        return None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return Refusal(
            FORBIDDEN,
            f"Host {printable(host[:100])!r} refused (DNS rebinding guard): use the server's address or "
            "localhost, or list the name in [web] hosts",
        )
    return None
