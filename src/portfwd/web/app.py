"""The `[web]` HTTP application: the page, `/api/v1`, and (sharing the listener) /metrics.

Every answer that is not the page or its assets is JSON; every error is `{"error": "one line"}`
with its status (400 bad input, 401 no or wrong token, 403 refused, 404, 405 with `Allow`,
409 the action does not apply, 413, 503 too many watchers), never a traceback. Every response
carries a strict Content-Security-Policy and friends (`SECURITY_HEADERS`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from portfwd import __version__
from portfwd.errors import ActionError
from portfwd.logevents import event
from portfwd.metrics import StateCollector
from portfwd.printable import printable
from portfwd.specs import WebSpec
from portfwd.state import State
from portfwd.web import guard
from portfwd.web.actions import MODES, Actions
from portfwd.web.feed import Feed, sse
from portfwd.web.openapi import document

log = logging.getLogger(__name__)

#: The largest request body an action takes.
MAX_BODY = 16 * 1024
#: The longest `reason` a session close may give.
MAX_REASON = 200
#: Live streams one client address may hold; seconds a stream may wait for its reader; seconds
#: a stream lasts before it ends (and the page opens another).
STREAMS_PER_CLIENT = 8
WRITE_TIMEOUT = 10.0
STREAM_LIFETIME = 3600.0

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
#: The page's files: URL name -> (file in assets/, content type).
ASSETS = {
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "app.css": ("app.css", "text/css; charset=utf-8"),
}
#: Reads that `auth = "all"` guards too (the page, its assets, info and the API's description
#: stay open: a browser must get as far as asking for the token).
GUARDED_READS = frozenset({"/api/v1/status", "/api/v1/events", "/api/v1/history", "/metrics"})
_REASONS = {
    404: "no such path; the API is under /api/v1 (see /api/v1/openapi.json)",
    413: f"request body too large (at most {MAX_BODY} bytes)",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """A request the API cannot read: one line, answered with 400."""


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """The one shape of every error answer."""
    return web.json_response({"error": message}, status=status, headers=headers)


class WebApp:
    """Builds the aiohttp Application for one `[web]` spec over one state."""

    def __init__(self, spec: WebSpec, state: State, actions: Actions | None, feed: Feed) -> None:
        self.spec = spec
        self.state = state
        self.actions = actions
        self.feed = feed
        self._assets: dict[str, bytes] = {}
        self._streams: dict[str, int] = {}  # live streams per client address
        self._openapi: bytes | None = None
        self.registry: CollectorRegistry | None = None
        if spec.metrics:
            self.registry = CollectorRegistry(auto_describe=True)
            self.registry.register(StateCollector(state))

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        app.on_response_prepare.append(_secure)
        routes = app.router
        routes.add_get("/", self.page)
        routes.add_get("/assets/{name}", self.asset)
        routes.add_get("/api/v1/info", self.info)
        routes.add_get("/api/v1/status", self.status)
        routes.add_get("/api/v1/history", self.history)
        routes.add_get("/api/v1/events", self.events)
        routes.add_get("/api/v1/openapi.json", self.openapi)
        routes.add_post("/api/v1/reload", self.reload)
        routes.add_post("/api/v1/rules/{rule}/{verb:pause|drain|resume}", self.rule_mode)
        routes.add_post("/api/v1/rules/{rule}/backends/{backend}/check", self.check_backend)
        routes.add_post("/api/v1/sessions/{session}/close", self.close_session)
        routes.add_delete("/api/v1/sessions/{session}", self.close_session)
        if self.registry is not None:
            routes.add_get("/metrics", self.metrics)
        return app

    # ------------------------------------------------------------------ the checks
    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            unrouted = request.match_info.http_exception
            if unrouted is not None:  # 404 and 405 before the token: they tell nothing
                raise unrouted
            refusal = self._refusal(request)
            if refusal is not None:
                return error(refusal.status, refusal.message, _challenge(refusal.status))
            return await handler(request)
        except web.HTTPException as exc:
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            if exc.status == 405:
                message = (
                    f"{request.method} is not allowed here; use {exc.headers.get('Allow', 'another method')}"
                )
            else:
                message = _REASONS.get(exc.status, exc.reason)
            return error(exc.status, message, headers)
        except BadRequest as exc:
            return error(400, str(exc))
        except ActionError as exc:
            return error(404 if exc.kind == "missing" else 409, exc.line())
        except Exception as exc:  # the per-request boundary: the server keeps serving
            log.exception("web: %s %s failed", request.method, printable(request.path[:200]))
            return error(500, f"internal error: {type(exc).__name__}")

    def _refusal(self, request: web.Request) -> guard.Refusal | None:
        headers = request.headers
        if (refusal := guard.known_host(headers.get("Host"), self.spec.hosts)) is not None:
            return refusal
        if request.method in ("GET", "HEAD") and (request.path == "/" or request.path.startswith("/assets/")):
            return None  # the page itself: a link from another site may open it (it cannot frame it)
        refusal = guard.same_origin(
            headers.get("Origin"),
            headers.get("Sec-Fetch-Site"),
            headers.get("Host"),
            headers.get("X-Forwarded-Host"),
        )
        if refusal is not None:
            return refusal
        acting = request.method not in ("GET", "HEAD", "OPTIONS")
        needed = acting or (self.spec.auth == "all" and request.path in GUARDED_READS)
        return guard.authorize(self.spec.token, guard.bearer(headers.get("Authorization")), needed=needed)

    # ------------------------------------------------------------------ the page
    def _asset(self, name: str) -> bytes:
        data = self._assets.get(name)
        if data is None:
            data = self._assets[name] = resources.files("portfwd.web").joinpath("assets", name).read_bytes()
        return data

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._asset("index.html"),
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def asset(self, request: web.Request) -> web.Response:
        known = ASSETS.get(request.match_info["name"])
        if known is None:
            raise web.HTTPNotFound()
        name, kind = known
        return web.Response(
            body=self._asset(name), headers={"Content-Type": kind, "Cache-Control": "no-cache"}
        )

    # ------------------------------------------------------------------ reads
    async def info(self, request: web.Request) -> web.Response:
        return _json(
            {
                "version": __version__,
                "instance": self.state.instance,
                "auth": self.spec.auth,
                "actions": self.spec.token is not None and self.actions is not None,
            }
        )

    async def status(self, request: web.Request) -> web.Response:
        return _json(await self.feed.current())

    async def history(self, request: web.Request) -> web.Response:
        return _json(self.feed.history())

    async def openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = json.dumps(document(), indent=1).encode()
        return web.Response(body=self._openapi, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        assert self.registry is not None
        await self.state.refresh()
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The live stream: the history, the status now, then a status each tick."""
        if request.method == "HEAD":
            return web.Response(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        peer = str(request.remote or "")
        if self._streams.get(peer, 0) >= STREAMS_PER_CLIENT:
            return error(503, f"this client has {STREAMS_PER_CLIENT} dashboards open already; close one")
        queue = self.feed.watch()
        if queue is None:
            return error(503, "too many dashboards watching this instance; close one and retry")
        self._streams[peer] = self._streams.get(peer, 0) + 1
        try:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-store",
                    "X-Accel-Buffering": "no",  # nginx in front: pass each event on at once
                }
            )
            await response.prepare(request)
            # A watcher that stops reading is dropped (its slot is not held forever), and every
            # stream ends after STREAM_LIFETIME: the page reconnects at once, with the token then.
            async with asyncio.timeout(STREAM_LIFETIME):
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await response.write(sse("history", self.feed.history()))
                    await response.write(await self.feed.status_event())
                while True:
                    data = await queue.get()
                    if not data:
                        break
                    async with asyncio.timeout(WRITE_TIMEOUT):
                        await response.write(data)
        except (ConnectionError, RuntimeError, TimeoutError):
            pass  # the watcher went away, stopped reading, or its time is up
        finally:
            self.feed.leave(queue)
            left = self._streams.pop(peer, 1) - 1
            if left:
                self._streams[peer] = left
        return response

    # ------------------------------------------------------------------ actions
    def _acting(self) -> Actions:
        if self.actions is None:
            raise ActionError("this instance takes no actions", kind="conflict")
        return self.actions

    def _done(self, request: web.Request, action: str, **fields: str | int) -> None:
        """One line per action carried out, and the next status read is made anew."""
        self.feed.invalidate()
        client = printable(str(request.remote or "?"))
        said = " ".join(f"{key}={printable(str(value))[:100]}" for key, value in fields.items())
        log.info(
            "web: %s %s (from %s)",
            action,
            said,
            client,
            extra=event("web.action", action=action, client=client, **fields),
        )

    async def reload(self, request: web.Request) -> web.Response:
        await _body(request, set())
        self._done(request, "reload")
        answer = await self._acting().reload()
        if not answer.get("ok"):
            errors = [str(line) for line in answer.get("errors", [])] or ["reload failed"]
            return web.json_response({"error": errors[0], **answer}, status=409)
        return _json(answer)

    async def rule_mode(self, request: web.Request) -> web.Response:
        await _body(request, set())
        rule, verb = request.match_info["rule"], request.match_info["verb"]
        await self._acting().set_mode(rule, MODES[verb])
        self._done(request, verb, rule=rule)
        return _json({"ok": True, "rule": rule, "mode": MODES[verb] or "running"})

    async def check_backend(self, request: web.Request) -> web.Response:
        await _body(request, set())
        rule, backend = request.match_info["rule"], request.match_info["backend"]
        ok, result = await self._acting().check_backend(rule, backend)
        self._done(request, "check", rule=rule, backend=backend, result=result)
        return _json({"ok": True, "rule": rule, "backend": backend, "passed": ok, "result": result})

    async def close_session(self, request: web.Request) -> web.Response:
        body = await _body(request, {"reason"})
        text = request.match_info["session"]
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise BadRequest(
                f"session id {printable(text[:40])!r} is not a session number; see /api/v1/status"
            )
        reason = body.get("reason", "closed by API")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
            raise BadRequest(f"body.reason: must be a non-empty string of at most {MAX_REASON} characters")
        reason = printable(reason.strip())
        await self._acting().end_session(int(text), reason)
        self._done(request, "close", session=int(text), reason=reason)
        return _json({"ok": True, "session": int(text), "reason": reason})


async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    """An action's JSON body: none, or an object with only `allowed` keys. Raises BadRequest."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except RecursionError as exc:
        raise BadRequest("body: JSON nested too deeply") from exc
    except ValueError as exc:  # UnicodeDecodeError is one too
        raise BadRequest(f"body: not JSON ({printable(str(exc))[:120]})") from exc
    if not isinstance(data, dict):
        raise BadRequest("body: expected a JSON object")
    unknown = sorted(str(key) for key in data if key not in allowed)
    if unknown:
        takes = ", ".join(sorted(allowed)) or "no keys"
        raise BadRequest(f"body.{printable(unknown[0][:40])}: unknown key; this action takes {takes}")
    return data


def _json(data: object) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _challenge(status: int) -> dict[str, str] | None:
    return {"WWW-Authenticate": 'Bearer realm="portfwd"'} if status == guard.UNAUTHORIZED else None


async def _secure(request: web.Request, response: web.StreamResponse) -> None:
    """Every response, errors and the stream included, carries the security headers."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers["Server"] = "portfwd"  # not the library and its version
