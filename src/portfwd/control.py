"""The local control socket: `portfwd status` reads state snapshots and `portfwd reload` asks
for a reload through it.

A Unix stream socket, mode 0600 (0660 with a `group`), that speaks one JSON line each way:
the client sends `{"command": "status"}` or `{"command": "reload"}`, and the server answers
one JSON object and closes. A request may name the config file it means (`"config": PATH`):
an instance running another file (or none) refuses it, so that `reload -c FILE` never
reloads the wrong instance. Where the socket lives is instances.py's concern.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from portfwd.errors import BindError, RuntimeFailure
from portfwd.printable import printable
from portfwd.relay.listener import StreamListener
from portfwd.state import State

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
Reloader = Callable[[], Awaitable[dict[str, Any]]]


class ControlServer:
    """Serves snapshots of `state` (and reloads through `reloader`) on a Unix socket."""

    def __init__(self, state: State, path: Path, reloader: Reloader | None, group: str | None = None) -> None:
        self.state = state
        self.path = path
        self.reloader = reloader
        self.group = group
        self._accepting: StreamListener | None = None
        self._made_dir = False

    async def start(self) -> None:
        """Bind the socket with safe permissions. Raises BindError."""
        where = f"control socket {self.path}"
        try:
            if not self.path.parent.is_dir():
                self.path.parent.mkdir(mode=0o700 if os.geteuid() else 0o755, parents=True)
                self._made_dir = True
        except OSError as exc:
            raise BindError(
                f"cannot create {self.path.parent}: {exc.strerror}", field="control.socket"
            ) from exc
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise BindError(
                    f"{where}: the path exists and is not a socket",
                    field="control.socket",
                    hint="remove it or choose another [control] socket",
                )
            if _answers(self.path):
                raise BindError(
                    f"{where} is in use: another portfwd of the same name is running",
                    field="control.socket",
                    hint="stop it, or give this instance another --name (portfwd status lists them)",
                )
            self.path.unlink()  # stale, from an instance that died
        gid = -1
        if self.group is not None:
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError as exc:
                raise BindError(f"no such group {self.group!r}", field="control.group") from exc
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is never visible with looser permissions
        try:
            listener.bind(str(self.path))
            listener.listen(socket.SOMAXCONN)  # many `status` at once must not meet EAGAIN
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            raise BindError(f"cannot listen on {where}: {exc.strerror}", field="control.socket") from exc
        finally:
            os.umask(old_umask)
        self._accepting = StreamListener(listener, self._handle, "control", MAX_REQUEST)
        self._accepting.start()
        self.state.add_listening("control", "control", [listener], "control")
        if gid >= 0:
            os.chown(self.path, -1, gid)
            os.chmod(self.path, 0o660)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                line = await reader.readline()
            answer: dict[str, Any]
            request = json.loads(line) if line.strip() else {}
            command = request.get("command") if isinstance(request, dict) else None
            meant = request.get("config") if isinstance(request, dict) else None
            if meant is not None and meant != self.state.config_path:
                runs = self.state.config_path or "no config file"
                answer = {
                    "ok": False,
                    "other_config": True,
                    "errors": [f"{self.path} is the instance running {runs}, not {meant}"],
                }
            elif command == "status":
                # No sample here: rates are per sampler interval, and many `status --watch`
                # would make them per request; status reads idle time without one.
                await self.state.refresh()  # the workers' parts, with `workers`
                answer = {"ok": True, "status": self.state.status().to_json()}
            elif command == "reload":
                if self.reloader is None:
                    answer = {
                        "ok": False,
                        "errors": ["this instance runs without a config file; nothing to reload"],
                    }
                else:
                    answer = await self.reloader()
            else:
                answer = {"ok": False, "errors": [f"unknown command {command!r}; use status or reload"]}
        except RecursionError:
            answer = {"ok": False, "errors": ["bad request: JSON nested too deeply"]}
        except (ValueError, TimeoutError, asyncio.LimitOverrunError) as exc:
            answer = {"ok": False, "errors": [f"bad request: {printable(str(exc))}"]}
        except Exception as exc:  # per-request boundary: the control socket keeps serving
            log.exception("control: request failed")
            answer = {"ok": False, "errors": [f"internal error: {type(exc).__name__}"]}
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()

    @property
    def made_dir(self) -> Path | None:
        """The directory `start` created for the socket (removed at stop when empty), or None."""
        return self.path.parent if self._made_dir else None

    async def stop(self) -> None:
        """Stop serving and remove the socket file."""
        if self._accepting is not None:
            self.state.remove_listening(["control"], "control")
            self._accepting.close()  # also unlinks the socket file
            self._accepting = None
            with contextlib.suppress(OSError):
                self.path.unlink()
            if self._made_dir:
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()  # only if empty: we leave nothing of ours behind


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _connect(client: socket.socket, path: Path, timeout: float) -> None:
    """connect(2), again while the instance's backlog is full (EAGAIN on a Unix socket)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            client.connect(str(path))
            return
        except BlockingIOError:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)  # bounded back-off: the instance accepts within milliseconds
            delay = min(delay * 2, 0.2)


def request(path: Path, command: str, timeout: float = 30.0, config: Path | None = None) -> dict[str, Any]:
    """Ask a running instance (blocking; used by the CLI), which must run `config` if given.

    Raises RuntimeFailure naming the path when nothing answers there.
    """
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        try:
            _connect(client, path, timeout)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise RuntimeFailure(
                f"no running portfwd: nothing answers on {path}",
                hint="start one with portfwd run; portfwd status lists the running ones",
            ) from exc
        except PermissionError as exc:
            raise RuntimeFailure(
                f"no permission to use {path}", hint="run as the same user, or as root"
            ) from exc
        message: dict[str, str] = {"command": command}
        if config is not None:
            message["config"] = str(config)
        client.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = client.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise RuntimeFailure(f"talking to {path} failed: {exc.strerror or exc}") from exc
    finally:
        client.close()
    try:
        answer = json.loads(data)
    except ValueError as exc:
        raise RuntimeFailure(f"{path} answered something that is not portfwd's JSON") from exc
    if not isinstance(answer, dict):
        raise RuntimeFailure(f"{path} answered something that is not portfwd's JSON")
    return answer
