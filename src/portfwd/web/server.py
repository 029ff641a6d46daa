"""The `[web]` listener: portfwd's own accept loop handing each client to aiohttp's protocol.

Not aiohttp's TCPSite: with uvloop a server object in the loop costs CPU on every *relayed*
connection, even unused (bench/RESULTS.md, D4), so clients are accepted as for /metrics and
given to aiohttp with `connect_accepted_socket`, which makes a transport for them alone.
At most MAX_CLIENTS connections at once; more are closed on accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from portfwd.errors import BindError
from portfwd.relay.listener import TcpListener
from portfwd.specs import WebSpec
from portfwd.state import State
from portfwd.web.actions import Actions
from portfwd.web.app import SECURITY_HEADERS, WebApp
from portfwd.web.feed import Feed

log = logging.getLogger(__name__)

#: Connections at once (dashboards, API clients, scrapes).
MAX_CLIENTS = 64
#: Seconds an idle keep-alive connection stays open (and a request may take to arrive whole).
KEEPALIVE = 15.0
#: aiohttp's own lines (a request it cannot parse, with a traceback quoting its headers, a
#: bearer token among them) go nowhere: what portfwd says about a request, it says itself.
_QUIET = logging.getLogger("portfwd.web.http")
_QUIET.propagate = False
_QUIET.addHandler(logging.NullHandler())


class _Handler(RequestHandler):
    """aiohttp's protocol, answering a request it cannot parse as every error is answered:
    one JSON line, with the security headers (its own answer is text, and names aiohttp)."""

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was sent already")
        line = "the request is not HTTP this server can read" if status < 500 else "internal error"
        response = web.json_response(
            {"error": line}, status=status, headers={**SECURITY_HEADERS, "Server": "portfwd"}
        )
        response.force_close()
        return response


class WebServer:
    """Serves the dashboard and API of `state` as `spec` says. start() raises BindError."""

    def __init__(self, spec: WebSpec, state: State, actions: Actions | None) -> None:
        self.spec = spec
        self.state = state
        self.feed = Feed(state)
        self.app = WebApp(spec, state, actions, self.feed)
        self._runner: web.AppRunner | None = None
        self._accepting: TcpListener | None = None
        self._clients: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        host, port = self.spec.listen.host or "0.0.0.0", self.spec.listen.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            listener = socket.create_server((host, port), family=family, backlog=64)
        except OSError as exc:
            raise BindError(
                f"cannot listen on {self.spec.listen}: {(exc.strerror or str(exc)).lower()}",
                field="web.listen",
                hint="pick another port in [web] listen",
            ) from exc
        listener.setblocking(False)
        runner = web.AppRunner(self.app.build(), shutdown_timeout=1.0, handler_cancellation=True)
        await runner.setup()
        self._runner = runner
        self._loop = asyncio.get_running_loop()
        self._accepting = TcpListener(listener, self._accept, "web")
        self._accepting.start()
        self.feed.start()
        self.state.add_listening("web", "http", [listener], "web")

    def _accept(self, client: socket.socket, peer: Any) -> None:
        server = self._runner.server if self._runner is not None else None
        if server is None or len(self._clients) + len(server.connections) >= MAX_CLIENTS:
            client.close()
            return
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(lambda: self._protocol(server), client))
        self._clients.add(task)  # until aiohttp's server lists the connection
        task.add_done_callback(self._connected)

    def _protocol(self, server: web.Server) -> RequestHandler:
        assert self._loop is not None
        return _Handler(
            server,
            loop=self._loop,
            keepalive_timeout=KEEPALIVE,
            access_log=None,  # type: ignore[arg-type]  # aiohttp takes None: no access log
            logger=_QUIET,
        )

    def _connected(self, task: asyncio.Task[Any]) -> None:
        self._clients.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("web: a client went away before it was served: %s", task.exception())

    @property
    def url(self) -> str:
        host = self.spec.listen.host or "0.0.0.0"
        return f"http://{f'[{host}]' if ':' in host else host}:{self.spec.listen.port}/"

    async def stop(self) -> None:
        """Stop accepting, end the streams, close every connection."""
        if self._accepting is not None:
            self.state.remove_listening(["web"], "web")
            self._accepting.close()
            self._accepting = None
        await self.feed.stop()
        runner, self._runner = self._runner, None
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        for task in list(self._clients):
            task.cancel()
