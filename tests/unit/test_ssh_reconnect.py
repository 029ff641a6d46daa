"""The tunnel's reconnect loop (portfwd/ssh/client.py `Tunnel._run`), with the SSH connect faked.

`reconnect_attempts` counts failures in a row, as autossh's AUTOSSH_MAXSTART does: a link that
came up starts the count (and the backoff) again.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import asyncssh
import pytest

from portfwd.errors import PortfwdError
from portfwd.specs import TunnelSpec
from portfwd.ssh import client, connection
from portfwd.ssh.errors import resolve_error
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
    tunnel = client.Tunnel(spec, State(), fatal.append, exit_on_auth=True)  # `portfwd ssh`: it exits
    await tunnel._run()
    assert attempts == [0, 1, 0, 0, 1, 0, 0, 1, 2], "each link lost backs off from 0; failures count anew"
    assert [error.line() for error in fatal] == ["t: gave up after 3 attempts: Connection refused"]
    assert outcomes == [], "three failures in a row, only after the last link"


@pytest.mark.parametrize(
    ("exit_on_auth", "retry", "fatal_lines", "state"),
    [
        (True, False, ["t: cannot resolve h: Name or service not known"], "failed"),
        (False, False, [], "failed"),
        (False, True, [], "failed"),
    ],
)
async def test_a_first_connect_that_cannot_succeed_is_not_retried(
    monkeypatch: pytest.MonkeyPatch, exit_on_auth: bool, retry: bool, fatal_lines: list[str], state: str
) -> None:
    """As ssh: an unknown host name on the first connect ends `portfwd ssh` (a [[tunnel]] stays
    failed) unless retry_first_connect; retried, it ends only by reconnect_attempts here."""
    unknown = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    tries: list[int] = []

    async def connect(*_: Any) -> object:
        tries.append(1)
        raise resolve_error("h", unknown)

    monkeypatch.setattr(connection, "connect", connect)
    monkeypatch.setattr(connection, "backoff", lambda _, attempt: 0.0)
    spec = TunnelSpec(
        label="t", ssh="h", user=None, host="h", port=None, reconnect_attempts=3, retry_first_connect=retry
    )
    fatal: list[PortfwdError] = []
    tunnel = client.Tunnel(spec, State(), fatal.append, exit_on_auth=exit_on_auth)
    await tunnel._run()
    if retry:  # a [[tunnel]] that runs out of attempts stays failed; the instance goes on
        assert len(tries) == 3
        assert fatal == []
        assert tunnel.stats.state == "failed"
        assert (
            tunnel.stats.last_error == "gave up after 3 attempts: cannot resolve h: Name or service not known"
        )
        return
    assert len(tries) == 1
    assert [error.line() for error in fatal] == fatal_lines
    assert tunnel.stats.state == state


async def test_a_link_that_once_worked_is_retried_whatever_the_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outcomes: list[BaseException | str] = ["up", asyncssh.PermissionDenied("Permission denied"), "up"]

    async def connect(*_: Any) -> object:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return object()

    async def serve_link(self: client.Tunnel, conn: object) -> None:
        self._connected_once = True
        if not outcomes:
            self._stopping = True

    monkeypatch.setattr(connection, "connect", connect)
    monkeypatch.setattr(connection, "backoff", lambda _, attempt: 0.0)
    monkeypatch.setattr(client.Tunnel, "_serve_link", serve_link)
    spec = TunnelSpec(label="t", ssh="h", user=None, host="h", port=None)
    fatal: list[PortfwdError] = []
    await client.Tunnel(spec, State(), fatal.append, exit_on_auth=True)._run()
    assert outcomes == []
    assert fatal == []
