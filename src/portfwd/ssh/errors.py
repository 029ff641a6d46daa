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

from portfwd.errors import ConfigError, PortfwdError, UpstreamError
from portfwd.proto.socks import Reply
from portfwd.ssh.hostkeys import HostKeyError
from portfwd.ssh.keys import KeyFileError, KeyLoginError


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
    `permanent` is True for what trying again cannot mend by itself: an unknown host name, every
    key refused, no algorithm in common, a host key that does not verify (ssh gives up on these
    at once; a tunnel retries them only on a link that once worked).
    """

    reason: Reason

    def __init__(self, message: str, *, reason: Reason, peer: bool = False, permanent: bool = False) -> None:
        super().__init__(message, reason=reason)
        self.reason = reason
        self.peer = peer
        self.permanent = permanent


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


#: RFC 4254 §5.1's names for a channel-open refusal's code, as ssh prints them.
_OPEN_CODES = {
    asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED: "administratively prohibited",
    asyncssh.OPEN_CONNECT_FAILED: "connect failed",
    asyncssh.OPEN_UNKNOWN_CHANNEL_TYPE: "unknown channel type",
    asyncssh.OPEN_RESOURCE_SHORTAGE: "resource shortage",
}

#: The resolver's answers that mean "no such name" (not "try again later": EAI_AGAIN is retried).
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def refusal_text(code: int, text: str) -> str:
    """A peer's channel-open refusal as people read it: its words, with the code's name when the
    words do not already say it (`open failed (administratively prohibited)`)."""
    name = _OPEN_CODES.get(code, f"code {code}")
    if not text:
        return name
    if code == asyncssh.OPEN_CONNECT_FAILED or name in text.lower():
        return text  # sshd and dropbear put the C library's words here (`Connection refused`)
    return f"{text} ({name})"


def ssh_error(exc: BaseException) -> SshError:
    """Map any failure met at the SSH layer into an SshError (itself unchanged)."""
    if isinstance(exc, SshError):
        return exc
    if isinstance(exc, asyncssh.ChannelOpenError):
        return SshError(
            refusal_text(exc.code, exc.reason), reason=_peer_reason(exc.code, exc.reason), peer=True
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
        permanent = isinstance(
            exc, asyncssh.PermissionDenied | asyncssh.HostKeyNotVerifiable | asyncssh.KeyExchangeFailed
        )
        return SshError(exc.reason or type(exc).__name__, reason=reason, permanent=permanent)
    if isinstance(exc, asyncssh.KeyImportError | asyncssh.KeyEncryptionError):  # a key ssh_config names
        return SshError(f"cannot use a private key: {exc}", reason=Reason.AUTH, permanent=True)
    if isinstance(exc, TimeoutError):
        return SshError(exc.strerror or "timed out", reason=Reason.TIMEOUT)
    if isinstance(exc, socket.gaierror):
        return SshError(exc.strerror or str(exc), reason=Reason.RESOLVE, permanent=exc.errno in _NO_SUCH_NAME)
    if isinstance(exc, OSError):
        return SshError(exc.strerror or str(exc), reason=_ERRNO.get(exc.errno or 0, Reason.ERROR))
    if isinstance(exc, UpstreamError):
        return SshError(str(exc), reason=_reason(exc.reason))
    if isinstance(exc, PortfwdError):
        hostkey = isinstance(exc, HostKeyError)
        permanent = hostkey or isinstance(exc, KeyFileError | KeyLoginError | ConfigError)
        return SshError(str(exc), reason=Reason.HOSTKEY if hostkey else Reason.ERROR, permanent=permanent)
    return SshError(str(exc) or type(exc).__name__, reason=Reason.ERROR)


def resolve_error(host: str, exc: socket.gaierror) -> SshError:
    """An SSH server's (or jump host's) name that did not resolve, named (ssh: "Could not resolve
    hostname"); permanent for "no such name", not for the resolver's "try again"."""
    return SshError(
        f"cannot resolve {host}: {exc.strerror or exc}",
        reason=Reason.RESOLVE,
        permanent=exc.errno in _NO_SUCH_NAME,
    )


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
