"""The SSH edge for errors: foreign ones (asyncssh, OSError, timeouts) become one SshError here.

Every failure the SSH layer meets is mapped once, by `ssh_error`, into an SshError with a short
`reason` code; the log line (`message`), the counter (`reason`), the SOCKS reply (`socks_reply`)
and the channel-open refusal sent to a peer (`channel_refusal`) all derive from it, so no code
elsewhere looks at an exception's text.

One thing only the text can tell: RFC 4254 gives a failed channel open a code (prohibited,
connect failed, resource shortage) and a free-text reason, and every server we meet (OpenSSH,
dropbear, portfwd's own) fills that text with the C library's words for the errno or resolver
error (`Connection refused`, `Name or service not known`), sometimes with more around them.
`_PEER_WORDS` reads those words back into a reason, wherever they are in the text; text with
none of them is a plain connect failure.
"""

from __future__ import annotations

import errno
import socket
from enum import StrEnum

import asyncssh

from portfwd.errors import PortfwdError, UpstreamError
from portfwd.proto.socks import Reply
from portfwd.ssh.hostkeys import HostKeyError


class Reason(StrEnum):
    """Why a connection, a channel or a link failed; the value is the counter's label."""

    REFUSED = "refused"  # the target refused the connection
    UNREACHABLE = "unreachable"  # no route to the target host
    NETWORK = "network"  # the target's network is unreachable
    RESOLVE = "resolve"  # the target's name does not resolve
    TIMEOUT = "timeout"  # no answer in time
    PROHIBITED = "prohibited"  # the SSH peer's policy forbids it
    SHORTAGE = "shortage"  # the SSH peer is out of channels or resources
    RESOURCES = "resources"  # we are out of descriptors
    DOWN = "down"  # the tunnel has no link to open a channel on
    LOST = "lost"  # the SSH connection was lost (the peer hung up, the network failed)
    DISCONNECTED = "disconnected"  # the SSH peer disconnected with an error (key exchange, protocol)
    AUTH = "auth"  # the server refused every key
    HOSTKEY = "hostkey"  # the server's host key is unknown or changed
    CLOSED = "closed"  # the other side went away meanwhile
    ERROR = "error"  # anything else


class SshError(UpstreamError):
    """A failure at the SSH layer: `message` for people, `reason` for counters and replies.

    `peer` is True when the SSH peer refused a channel (its answer, not our own failure).
    """

    reason: Reason

    def __init__(self, message: str, *, reason: Reason, peer: bool = False) -> None:
        super().__init__(message, reason=reason)
        self.reason = reason
        self.peer = peer


#: Words in a peer's "connect failed" refusal, in the order they are tried, and what they mean.
#: RFC 4254 §5.1 gives such a refusal one code (OPEN_CONNECT_FAILED) and free text: sshd sends
#: the C library's words ("Connection refused"), dropbear its own ("Error resolving 'x' port
#: '80'. Name or service not known"), portfwd server "Cannot resolve: ...". The words are the
#: only signal, so they are read here, once, anywhere in the text.
_PEER_WORDS = (
    ("refused", Reason.REFUSED),
    ("network is unreachable", Reason.NETWORK),
    ("no route", Reason.UNREACHABLE),
    ("unreachable", Reason.UNREACHABLE),
    ("name or service", Reason.RESOLVE),  # glibc's EAI_NONAME
    ("name resolution", Reason.RESOLVE),  # glibc's EAI_AGAIN
    ("resolv", Reason.RESOLVE),
    ("getaddrinfo", Reason.RESOLVE),
    ("not a valid host name", Reason.RESOLVE),
    ("timed out", Reason.TIMEOUT),
    ("prohibited", Reason.PROHIBITED),
)

_ERRNO = {
    errno.ECONNREFUSED: Reason.REFUSED,
    errno.EHOSTUNREACH: Reason.UNREACHABLE,
    errno.ENETUNREACH: Reason.NETWORK,
    errno.ETIMEDOUT: Reason.TIMEOUT,
    errno.EMFILE: Reason.RESOURCES,
    errno.ENFILE: Reason.RESOURCES,
}

_REPLY = {
    Reason.REFUSED: Reply.CONNECTION_REFUSED,
    Reason.UNREACHABLE: Reply.HOST_UNREACHABLE,
    Reason.RESOLVE: Reply.HOST_UNREACHABLE,
    Reason.NETWORK: Reply.NETWORK_UNREACHABLE,
    Reason.DOWN: Reply.NETWORK_UNREACHABLE,
    Reason.TIMEOUT: Reply.TTL_EXPIRED,
    Reason.PROHIBITED: Reply.NOT_ALLOWED,
}


def _reason(label: str) -> Reason:
    """An UpstreamError's label (relay/upstream.py uses the same words) as a Reason."""
    try:
        return Reason(label)
    except ValueError:
        return Reason.ERROR


def _peer_reason(code: int, text: str) -> Reason:
    """A channel-open refusal's code, and for "connect failed" its words, as a Reason."""
    if code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
        return Reason.PROHIBITED
    if code == asyncssh.OPEN_RESOURCE_SHORTAGE:
        return Reason.SHORTAGE
    lowered = text.lower()
    return next((reason for words, reason in _PEER_WORDS if words in lowered), Reason.ERROR)


def ssh_error(exc: BaseException) -> SshError:
    """Map any failure met at the SSH layer into an SshError (itself unchanged)."""
    if isinstance(exc, SshError):
        return exc
    if isinstance(exc, asyncssh.ChannelOpenError):
        return SshError(
            exc.reason or type(exc).__name__, reason=_peer_reason(exc.code, exc.reason), peer=True
        )
    if isinstance(exc, asyncssh.DisconnectError):
        reason = (
            Reason.LOST
            if isinstance(exc, asyncssh.ConnectionLost)
            else Reason.AUTH
            if isinstance(exc, asyncssh.PermissionDenied)
            else Reason.HOSTKEY
            if isinstance(exc, asyncssh.HostKeyNotVerifiable)
            else Reason.DISCONNECTED
        )
        return SshError(exc.reason or type(exc).__name__, reason=reason)
    if isinstance(exc, TimeoutError):
        return SshError(exc.strerror or "timed out", reason=Reason.TIMEOUT)
    if isinstance(exc, socket.gaierror):
        return SshError(exc.strerror or str(exc), reason=Reason.RESOLVE)
    if isinstance(exc, OSError):
        return SshError(exc.strerror or str(exc), reason=_ERRNO.get(exc.errno or 0, Reason.ERROR))
    if isinstance(exc, UpstreamError):
        return SshError(str(exc), reason=_reason(exc.reason))
    if isinstance(exc, PortfwdError):
        return SshError(str(exc), reason=Reason.HOSTKEY if isinstance(exc, HostKeyError) else Reason.ERROR)
    return SshError(str(exc) or type(exc).__name__, reason=Reason.ERROR)


def socks_reply(error: SshError) -> Reply:
    """The SOCKS reply code for why an upstream (a channel, a local connect) did not open."""
    return _REPLY.get(error.reason, Reply.GENERAL_FAILURE)


def socks_reply_for(exc: BaseException) -> Reply:
    """`socks_reply` for any exception (mapped by `ssh_error` first)."""
    return socks_reply(ssh_error(exc))


def channel_refusal(error: SshError, text: str | None = None) -> asyncssh.ChannelOpenError:
    """The channel-open failure to send an SSH peer for `error` (`text`, or its message)."""
    code = (
        asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
        if error.reason == Reason.PROHIBITED
        else asyncssh.OPEN_RESOURCE_SHORTAGE
        if error.reason == Reason.SHORTAGE
        else asyncssh.OPEN_CONNECT_FAILED
    )
    return asyncssh.ChannelOpenError(code, error.message if text is None else text)
