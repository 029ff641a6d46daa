"""The SSH edge for errors (portfwd/ssh/errors.py): foreign errors in, one SshError with a reason out."""

from __future__ import annotations

import errno
import socket

import asyncssh
import pytest

from portfwd.errors import RuntimeFailure, UpstreamError
from portfwd.proto.socks import Reply
from portfwd.ssh.errors import Reason, SshError, channel_refusal, socks_reply, ssh_error
from portfwd.ssh.hostkeys import HostKeyError


@pytest.mark.parametrize(
    ("error", "message", "reason", "peer"),
    [
        (asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection refused"), "Connection refused",
         Reason.REFUSED, True),
        (asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Cannot resolve: name or service not known"),
         "Cannot resolve: name or service not known", Reason.RESOLVE, True),
        (asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "No answer within 10s"), "No answer within 10s",
         Reason.ERROR, True),
        (asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "open failed"),
         "open failed (administratively prohibited)", Reason.PROHIBITED, True),
        (asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, ""), "administratively prohibited",
         Reason.PROHIBITED, True),
        (asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, "full"), "full (resource shortage)",
         Reason.SHORTAGE, True),
        (asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, ""), "connect failed", Reason.ERROR, True),
        (asyncssh.ConnectionLost("Connection lost"), "Connection lost", Reason.LOST, False),
        (asyncssh.PermissionDenied("Permission denied"), "Permission denied", Reason.AUTH, False),
        (asyncssh.KeyExchangeFailed("No matching"), "No matching", Reason.DISCONNECTED, False),
        (TimeoutError(), "timed out", Reason.TIMEOUT, False),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "Connection refused",
         Reason.REFUSED, False),
        (OSError(errno.EMFILE, "Too many open files"), "Too many open files", Reason.RESOURCES, False),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "Name or service not known",
         Reason.RESOLVE, False),
        (UpstreamError("connection refused", reason="refused"), "connection refused", Reason.REFUSED, False),
        (UpstreamError("odd", reason="something new"), "odd", Reason.ERROR, False),
        (RuntimeFailure("broken"), "broken", Reason.ERROR, False),
        (HostKeyError("10.0.0.1: host key changed"), "10.0.0.1: host key changed", Reason.HOSTKEY, False),
        (asyncssh.ChannelListenError("Failed to create remote TCP listener"),
         "Failed to create remote TCP listener", Reason.ERROR, False),
    ],
)  # fmt: skip
def test_foreign_errors_are_mapped_once(
    error: BaseException, message: str, reason: Reason, peer: bool
) -> None:
    mapped = ssh_error(error)
    assert (mapped.message, mapped.reason, mapped.peer) == (message, reason, peer)
    assert str(mapped) == message
    assert ssh_error(mapped) is mapped, "an SshError passes the edge unchanged"


@pytest.mark.parametrize(
    ("error", "permanent"),
    [
        (asyncssh.PermissionDenied("Permission denied"), True),
        (asyncssh.KeyExchangeFailed("No matching"), True),
        (asyncssh.HostKeyNotVerifiable("Host key is not trusted"), True),
        (HostKeyError("host key changed"), True),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), True),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), False),
        (asyncssh.ConnectionLost("Connection lost"), False),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), False),
        (TimeoutError(), False),
        (asyncssh.KeyImportError("Passphrase must be specified to import encrypted private keys"), True),
    ],
)  # fmt: skip
def test_what_a_retry_cannot_mend_is_permanent(error: BaseException, permanent: bool) -> None:
    assert ssh_error(error).permanent is permanent


def test_an_ssh_error_is_an_upstream_error_whose_reason_is_the_counter_label() -> None:
    error = SshError("tunnel down", reason=Reason.DOWN)
    assert isinstance(error, UpstreamError)
    assert error.reason == "down"
    assert socks_reply(error) == Reply.NETWORK_UNREACHABLE


@pytest.mark.parametrize(
    ("text", "reply"),
    [
        ("Connection refused", Reply.CONNECTION_REFUSED),  # OpenSSH sshd
        ("connect failed: Connection refused (111)", Reply.CONNECTION_REFUSED),
        ("Error resolving 'nowhere.invalid' port '80'. Name or service not known", Reply.HOST_UNREACHABLE),
        ("Error connecting: Connection refused", Reply.CONNECTION_REFUSED),  # dropbear
        ("Cannot resolve: no address associated with hostname", Reply.HOST_UNREACHABLE),
        ("Temporary failure in name resolution", Reply.HOST_UNREACHABLE),
        ("Host unreachable", Reply.HOST_UNREACHABLE),
        ("No route to host", Reply.HOST_UNREACHABLE),
        ("Network is unreachable", Reply.NETWORK_UNREACHABLE),
        ("Connection timed out", Reply.TTL_EXPIRED),
        ("No answer within 10s", Reply.GENERAL_FAILURE),
    ],
)
def test_a_peers_connect_failed_words_choose_the_socks_reply_wherever_they_are(
    text: str, reply: Reply
) -> None:
    refusal = asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, text)
    assert socks_reply(ssh_error(refusal)) == reply


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        (Reason.PROHIBITED, asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED),
        (Reason.SHORTAGE, asyncssh.OPEN_RESOURCE_SHORTAGE),
        (Reason.REFUSED, asyncssh.OPEN_CONNECT_FAILED),
        (Reason.TIMEOUT, asyncssh.OPEN_CONNECT_FAILED),
    ],
)
def test_channel_refusals_carry_the_code_and_read_back_the_same(reason: Reason, code: int) -> None:
    refusal = channel_refusal(SshError("connection refused", reason=reason), "Connection refused")
    assert (refusal.code, refusal.reason) == (code, "Connection refused")
    if reason != Reason.TIMEOUT:
        assert ssh_error(refusal).reason == reason, "what we send, a client of ours reads back"
