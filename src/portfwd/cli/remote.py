"""`portfwd status --url`: a remote instance's status through its `[web]` API.

urllib (stdlib), because one GET needs nothing more. Redirects are not followed: a redirect
would carry the bearer token to wherever the answer points.
"""

from __future__ import annotations

import json
import stat
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from portfwd.errors import RuntimeFailure, UsageError
from portfwd.printable import printable

TIMEOUT = 10.0
MAX_ANSWER = 64 * 1024 * 1024
STATUS_PATH = "/api/v1/status"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises the 3xx as an HTTPError


def status_url(url: str) -> str:
    """The status endpoint of the instance at `url` (`http://host:port`, with or without a path
    of /api/v1/status). Raises UsageError naming --url."""
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:
        raise UsageError(f"--url: {printable(url)!r} is not a URL", hint="write http://HOST:PORT") from exc
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--url: {printable(url)!r} is not an http(s) URL", hint="write http://HOST:PORT")
    path = parts.path.rstrip("/")
    if not path.endswith(STATUS_PATH):
        path += STATUS_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def read_token(path: str) -> str:
    """The token in `path`, which only its owner may read (as ssh treats a private key).
    Raises UsageError naming --token-file."""
    file = Path(path).expanduser()
    try:
        mode = file.stat().st_mode
        text = file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"--token-file: cannot read {file}: {(exc.strerror or str(exc)).lower()}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"--token-file: {file} is not text") from exc
    if stat.S_ISREG(mode) and mode & 0o077:  # root too: the file is as readable by others
        raise UsageError(
            f"--token-file: {file} is readable by other users (mode {mode & 0o777:04o}); chmod 600 it"
        )
    if not text or any(char.isspace() for char in text):
        raise UsageError(f"--token-file: {file} must hold the token as one line")
    return text


def fetch_status(url: str, token: str | None) -> dict[str, Any]:
    """GET the status snapshot. Raises RuntimeFailure, one line: nothing answers, the instance
    refused (its own line), or the answer is not portfwd's status."""
    where = status_url(url)
    request = urllib.request.Request(where, headers={"Accept": "application/json"})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=TIMEOUT) as answer:
            body = answer.read(MAX_ANSWER + 1)
    except urllib.error.HTTPError as exc:
        said = _error_line(exc.read(4096))
        hint = (
            "give --token-file FILE (the instance's [web] token_file)"
            if exc.code == 401 and token is None
            else None
        )
        raise RuntimeFailure(f"{where} answered {exc.code}: {said}", hint=hint) from exc
    except urllib.error.URLError as exc:
        reason = (
            exc.reason.strerror if isinstance(exc.reason, OSError) and exc.reason.strerror else exc.reason
        )
        raise RuntimeFailure(f"nothing answers at {where}: {printable(str(reason)).lower()}") from exc
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"reading {where} failed: {printable(str(exc))}") from exc
    if len(body) > MAX_ANSWER:
        raise RuntimeFailure(f"{where} answered more than {MAX_ANSWER} bytes; not portfwd's status")
    try:
        snapshot = json.loads(body)
    except ValueError as exc:
        raise RuntimeFailure(
            f"{where} answered something that is not JSON; is it a portfwd [web] listener?"
        ) from exc
    if not isinstance(snapshot, dict):
        raise RuntimeFailure(f"{where} answered JSON that is not portfwd's status")
    return snapshot


def _error_line(body: bytes) -> str:
    try:
        said = json.loads(body).get("error")
    except (ValueError, AttributeError):
        said = None
    return printable(str(said))[:300] if said else "(no portfwd error line)"
