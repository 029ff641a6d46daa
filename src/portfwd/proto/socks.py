"""A sans-IO SOCKS server codec: SOCKS4, SOCKS4a and SOCKS5 CONNECT (RFC 1928, RFC 1929).

Like h11, it only turns bytes into events and decisions into bytes: the caller feeds what the
client sent, gets a `Request` when one is complete, opens the upstream however it likes (an SSH
channel, a TCP connection), and only then answers with `accept()` or `refuse(code)`, so the
client learns the real outcome (refused, unreachable, not allowed...). A malformed request
raises `SocksError`, whose `reply` holds the answer the protocol has for it (or nothing when
there is none, e.g. an unknown version byte); the caller sends it and closes.
"""

from __future__ import annotations

import hmac
import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

#: Bytes a client may send before its request is complete; a longer greeting is garbage.
MAX_REQUEST = 1024


class Reply(IntEnum):
    """SOCKS5 reply codes (RFC 1928 §6); SOCKS4 folds every failure into 91 (rejected)."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


class SocksError(Exception):
    """The client sent something this server cannot serve; `reply` is the answer to send first."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.message = message
        self.reply = reply


class SocksAuthError(SocksError):
    """The client gave a wrong username or password (the I/O layer delays and counts these)."""


@dataclass(frozen=True, slots=True)
class Request:
    """A complete CONNECT request: where the client wants to go."""

    version: int
    host: str
    port: int
    user: str | None = None

    @property
    def target(self) -> str:
        """`host:port` (`[v6]:port`) for logs."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_NEED_MORE = None
_SOCKS4_REJECTED = b"\x00\x5b" + bytes(6)


class SocksServer:
    """One client's SOCKS handshake, from its first byte to the reply.

    Call `feed(data)` with every chunk the client sends until it returns a Request (None means
    "need more bytes"); after each call send `outgoing()`. Then `accept(host, port)` or
    `refuse(code)` give the final reply. `trailing` holds bytes the client sent after its request
    (optimistic data), which belong to the upstream. `credentials`, when set, makes SOCKS5
    require username/password and refuses SOCKS4 (which cannot carry a password).
    """

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.credentials = credentials
        self.version = 0
        self.trailing = b""
        self.request: Request | None = None
        self._buffer = b""
        self._out = bytearray()
        self._stage = "start"  # start -> (auth) -> request -> waiting -> done
        self._user: str | None = None

    def outgoing(self) -> bytes:
        """Bytes to send to the client now (drains the buffer)."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def feed(self, data: bytes) -> Request | None:
        """Take bytes from the client; return the Request once complete. Raises SocksError."""
        if self._stage in ("waiting", "done"):
            self.trailing += data
            return None
        self._buffer += data
        if len(self._buffer) > MAX_REQUEST:
            raise SocksError(f"request longer than {MAX_REQUEST} bytes", self._failure(Reply.GENERAL_FAILURE))
        while True:
            before = self._stage
            result = self._step()
            if result is not None or self._stage == before:
                return result

    def _failure(self, code: Reply) -> bytes:
        if self.version == 4:
            return _SOCKS4_REJECTED
        if self.version == 5:
            return bytes((5, code, 0, 1)) + bytes(6)
        return b""

    def _step(self) -> Request | None:
        buffer = self._buffer
        if self._stage == "start":
            if not buffer:
                return _NEED_MORE
            if buffer[0] == 4:
                self.version = 4
                return self._socks4()
            if buffer[0] == 5:
                self.version = 5
                return self._greeting()
            raise SocksError(f"not a SOCKS request (first byte 0x{buffer[0]:02x}); expected SOCKS 4 or 5")
        if self._stage == "auth":
            return self._password()
        if self._stage == "request":
            return self._socks5()
        return _NEED_MORE

    # SOCKS4 / 4a: VN CD DSTPORT DSTIP USERID\0 [HOST\0]
    def _socks4(self) -> Request | None:
        buffer = self._buffer
        if len(buffer) < 9:
            return _NEED_MORE
        _, command, port = struct.unpack_from("!BBH", buffer)
        end = buffer.find(b"\0", 8)
        if end < 0:
            return _NEED_MORE
        user = buffer[8:end].decode("utf-8", "replace")
        rest = end + 1
        raw_ip = buffer[4:8]
        if raw_ip[:3] == b"\0\0\0" and raw_ip[3] != 0:  # SOCKS4a: a host name follows
            host_end = buffer.find(b"\0", rest)
            if host_end < 0:
                return _NEED_MORE
            host = _host_name(buffer[rest:host_end], self._failure(Reply.GENERAL_FAILURE))
            rest = host_end + 1
        else:
            host = str(ipaddress.IPv4Address(raw_ip))
        if command != 1:
            raise SocksError(f"SOCKS4 command {command} is not supported (only CONNECT)", _SOCKS4_REJECTED)
        if self.credentials is not None:
            raise SocksError(
                "SOCKS4 cannot authenticate and this server requires a password", _SOCKS4_REJECTED
            )
        if port == 0:
            raise SocksError("SOCKS4 request for port 0", _SOCKS4_REJECTED)
        return self._complete(Request(4, host, port, user or None), rest)

    # SOCKS5 greeting: VER NMETHODS METHODS...
    def _greeting(self) -> Request | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return _NEED_MORE
        count = buffer[1]
        if len(buffer) < 2 + count:
            return _NEED_MORE
        methods = set(buffer[2 : 2 + count])
        self._buffer = buffer[2 + count :]
        wanted = 2 if self.credentials is not None else 0
        if wanted not in methods:
            offered = ", ".join(str(method) for method in sorted(methods)) or "none"
            need = "username/password (2)" if wanted == 2 else "no authentication (0)"
            raise SocksError(
                f"SOCKS5 client offered methods {offered}; this server needs {need}", b"\x05\xff"
            )
        self._out += bytes((5, wanted))
        self._stage = "auth" if wanted == 2 else "request"
        return _NEED_MORE

    # RFC 1929: VER ULEN UNAME PLEN PASSWD
    def _password(self) -> Request | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return _NEED_MORE
        if buffer[0] != 1:
            raise SocksError(f"username/password sub-negotiation version {buffer[0]} (want 1)", b"\x01\x01")
        user_end = 2 + buffer[1]
        if len(buffer) < user_end + 1:
            return _NEED_MORE
        password_end = user_end + 1 + buffer[user_end]
        if len(buffer) < password_end:
            return _NEED_MORE
        user = buffer[2:user_end]
        password = buffer[user_end + 1 : password_end]
        self._buffer = buffer[password_end:]
        assert self.credentials is not None
        good_user, good_password = (part.encode() for part in self.credentials)
        # Compare both fields always, in constant time, so timing reveals neither.
        if not (hmac.compare_digest(user, good_user) & hmac.compare_digest(password, good_password)):
            raise SocksAuthError(
                f"wrong SOCKS5 username or password for {user.decode('utf-8', 'replace')!r}", b"\x01\x01"
            )
        self._user = user.decode("utf-8", "replace")
        self._out += b"\x01\x00"
        self._stage = "request"
        return _NEED_MORE

    # SOCKS5 request: VER CMD RSV ATYP DST.ADDR DST.PORT
    def _socks5(self) -> Request | None:
        buffer = self._buffer
        if len(buffer) < 4:
            return _NEED_MORE
        version, command, _, kind = buffer[:4]
        failure = self._failure
        if version != 5:
            raise SocksError(f"SOCKS5 request with version {version}", failure(Reply.GENERAL_FAILURE))
        if kind == 1:
            end = 4 + 4
            if len(buffer) < end + 2:
                return _NEED_MORE
            host = str(ipaddress.IPv4Address(buffer[4:end]))
        elif kind == 3:
            if len(buffer) < 5:
                return _NEED_MORE
            end = 5 + buffer[4]
            if len(buffer) < end + 2:
                return _NEED_MORE
            host = _host_name(buffer[5:end], failure(Reply.GENERAL_FAILURE))
        elif kind == 4:
            end = 4 + 16
            if len(buffer) < end + 2:
                return _NEED_MORE
            host = str(ipaddress.IPv6Address(buffer[4:end]))
        else:
            raise SocksError(
                f"SOCKS5 address type {kind} is not supported", failure(Reply.ADDRESS_TYPE_NOT_SUPPORTED)
            )
        (port,) = struct.unpack_from("!H", buffer, end)
        if command != 1:
            names = {2: "BIND", 3: "UDP ASSOCIATE"}
            name = names.get(command, str(command))
            raise SocksError(
                f"SOCKS5 command {name} is not supported (only CONNECT)", failure(Reply.COMMAND_NOT_SUPPORTED)
            )
        if port == 0:
            raise SocksError("SOCKS5 request for port 0", failure(Reply.GENERAL_FAILURE))
        return self._complete(Request(5, host, port, self._user), end + 2)

    def _complete(self, request: Request, used: int) -> Request:
        self.trailing = self._buffer[used:]
        self._buffer = b""
        self._stage = "waiting"
        self.request = request
        return request

    def accept(self, host: str = "0.0.0.0", port: int = 0) -> bytes:
        """The success reply, naming the address the upstream was opened from (if known)."""
        self._stage = "done"
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = ipaddress.IPv4Address(0)
        if self.version == 4:
            packed = address.packed if address.version == 4 else bytes(4)
            return b"\x00\x5a" + struct.pack("!H", port) + packed
        kind = 1 if address.version == 4 else 4
        return bytes((5, 0, 0, kind)) + address.packed + struct.pack("!H", port)

    def refuse(self, code: Reply) -> bytes:
        """The failure reply for `code` (SOCKS4 has one: 91, rejected or failed)."""
        self._stage = "done"
        return self._failure(code)


def _host_name(raw: bytes, failure: bytes) -> str:
    """A requested host name, checked: printable, no NUL, at most 255 bytes."""
    try:
        host = raw.decode("ascii")
    except UnicodeDecodeError:
        raise SocksError("SOCKS host name is not ASCII", failure) from None
    if not host or len(host) > 255 or not all(33 <= ord(char) < 127 for char in host):
        raise SocksError(f"SOCKS host name {host!r} is not a valid name", failure)
    return host
