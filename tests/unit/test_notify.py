"""sd_notify datagrams (notify.py) as a real AF_UNIX datagram socket receives them."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portfwd.notify import Notifier, address


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing for systemd's notify socket, and its $NOTIFY_SOCKET value."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(5)
        yield listener, str(path)


def fields(datagram: bytes) -> dict[str, str]:
    """KEY=VALUE lines, each key once (a repeated key would be a forged line)."""
    lines = datagram.decode().split("\n")
    pairs = dict(line.split("=", 1) for line in lines)
    assert len(pairs) == len(lines), datagram
    return pairs


def test_ready_is_one_datagram_with_status(manager: tuple[socket.socket, str]) -> None:
    listener, path = manager
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("2 rule(s), 2 listening socket(s), 0 tunnel(s)")
    assert listener.recv(4096) == b"READY=1\nSTATUS=2 rule(s), 2 listening socket(s), 0 tunnel(s)"


def test_reloading_carries_the_monotonic_clock_then_ready_ends_it(manager: tuple[socket.socket, str]) -> None:
    listener, path = manager
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.ready("1 rule(s)")
    assert fields(listener.recv(4096))["READY"] == "1"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading = fields(listener.recv(4096))
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    notifier.reloaded("2 rule(s)")
    assert fields(listener.recv(4096)) == {"READY": "1", "STATUS": "2 rule(s)"}


def test_a_reload_before_ready_is_not_told(manager: tuple[socket.socket, str]) -> None:
    """A SIGHUP while portfwd starts must not send READY=1 before every listener is up."""
    listener, path = manager
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert not notifier.reloading()
    assert not notifier.reloaded("0 rule(s)")
    notifier.ready("1 rule(s)")
    assert listener.recv(4096) == b"READY=1\nSTATUS=1 rule(s)"


def test_stopping(manager: tuple[socket.socket, str]) -> None:
    listener, path = manager
    Notifier({"NOTIFY_SOCKET": path}).stopping()
    assert fields(listener.recv(4096))["STOPPING"] == "1"


def test_abstract_namespace_address() -> None:
    name = f"portfwd-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert listener.recv(4096) == b"READY=1\nSTATUS=up"


def test_a_newline_in_the_status_cannot_forge_a_key(manager: tuple[socket.socket, str]) -> None:
    listener, path = manager
    Notifier({"NOTIFY_SOCKET": path}).ready("rule x\nREADY=0\r\nSTOPPING=1")
    assert fields(listener.recv(4096)) == {"READY": "1", "STATUS": "rule x READY=0 STOPPING=1"}


@pytest.mark.parametrize("value", ["", "relative/notify", "vsock:2:1234"])
def test_nothing_is_sent_without_a_unix_socket_to_send_to(value: str) -> None:
    environ = {"NOTIFY_SOCKET": value} if value else {}
    assert address(environ) is None
    notifier = Notifier(environ)
    assert not notifier.enabled
    assert not notifier.ready("up")
    assert not notifier.stopping()


def test_a_gone_manager_is_one_warning_and_never_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.WARNING, logger="portfwd.notify"):
        assert not notifier.ready("up")
        assert not notifier.reloading()
        assert not notifier.stopping()
    warnings = [record.getMessage() for record in caplog.records if record.name == "portfwd.notify"]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"cannot notify the service manager at {tmp_path / 'nobody-listens'}: ")


def test_the_environment_is_read_when_none_is_given(
    manager: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    listener, path = manager
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert Notifier().ready("up")
    assert listener.recv(4096) == b"READY=1\nSTATUS=up"
