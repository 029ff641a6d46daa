"""Types of the C engine (relay/_native.c); relay/native.py is its one user."""

from collections.abc import Callable
from typing import Any

OPEN: int
FAILED: int
EXHAUSTED: int
REFUSED: int
ACCEPT_FAILED: int
CLOSED: int
LINES: int
DENIED: int
RETRY: int
FAIL_PROXY: int
LINES_TEXT: int
LINES_JSON: int
FAIL_CONNECT: int
FAIL_SOCKET: int
FAIL_TIMEOUT: int

class Link:
    up: int
    down: int
    upstream: int
    client: int
    closed: bool
    token: Any
    session: Any
    backend: int
    counted: bool
    client_text: str
    def close(self, reason: str, /) -> None: ...
    def connect(
        self, index: int, target: tuple[str, int], seconds: float, texts: tuple[str, str, str, str], /
    ) -> int: ...
    def fail(self) -> None: ...

class Engine:
    closed: Callable[[Link, str], None] | None
    mode: Callable[[], int] | None
    dispatch: Callable[[list[tuple[Any, ...]], int], None] | None
    live: int
    pooled: int
    def __init__(self, pipe_size: int = ..., keepalive: tuple[int, int, int] = ...) -> None: ...
    def listen(
        self,
        fd: int,
        token: Any,
        targets: list[tuple[str, int]],
        timeout: float,
        keepalive: bool,
        texts: tuple[tuple[str, str, str, str], ...],
        allow: tuple[tuple[bytes, int], ...] = (),
        deny: tuple[tuple[bytes, int], ...] = (),
        picker: Callable[[str], tuple[int, float]] | None = None,
        proxy: int = 0,
        local: tuple[str, int] | None = None,
        balance: tuple[int, list[int], bytearray, float] | None = None,
        /,
    ) -> None: ...
    def watch(self, fd: int, on: bool, /) -> None: ...
    def refuse(self, fd: int, on: bool, /) -> None: ...
    def unlisten(self, fd: int, /) -> None: ...
    def abandon(self, token: Any, /) -> int: ...
    def run(self, lines: int | None = None, /) -> list[tuple[Any, ...]] | None: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...
