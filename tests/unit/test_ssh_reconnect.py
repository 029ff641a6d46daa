"""The tunnel's reconnect loop (portfwd/ssh/client.py `Tunnel._run`), with the SSH connect faked.

`reconnect_attempts` counts failures in a row, as autossh's AUTOSSH_MAXSTART does: a link that
came up starts the count (and the backoff) again.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from portfwd.errors import PortfwdError
from portfwd.specs import TunnelSpec
from portfwd.ssh import client, connection
from portfwd.state import State


async def test_a_link_that_worked_starts_the_count_of_failures_again(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    outcomes: list[BaseException | str] = [
        refused,
        refused,
        "up",
        refused,
        refused,
        "up",
        refused,
        refused,
        refused,
    ]
    attempts: list[int] = []
    fatal: list[PortfwdError] = []

    async def connect(*_: Any) -> object:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return object()

    async def serve_link(self: client.Tunnel, conn: object) -> None:
        """The link comes up and is lost at once."""

    def backoff(_: TunnelSpec, attempt: int) -> float:
        attempts.append(attempt)
        return 0.0

    monkeypatch.setattr(connection, "connect", connect)
    monkeypatch.setattr(connection, "backoff", backoff)
    monkeypatch.setattr(client.Tunnel, "_serve_link", serve_link)
    spec = TunnelSpec(label="t", ssh="h", user=None, host="h", port=None, reconnect_attempts=3)
    tunnel = client.Tunnel(spec, State(), fatal.append)
    await tunnel._run()
    assert attempts == [0, 1, 0, 0, 1, 0, 0, 1, 2], "each link lost backs off from 0; failures count anew"
    assert [error.line() for error in fatal] == ["t: gave up after 3 attempts: Connection refused"]
    assert outcomes == [], "three failures in a row, only after the last link"
