"""The conformance suite against portfwd's own TCP relay paths: splice and Protocol, v4, v6, Unix."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator

import pytest

from portfwd.relay import native
from portfwd.relay.forwarder import TcpForwarder
from portfwd.relay.nativeforward import NativeForwarder
from portfwd.relay.splice import splice_available
from tests.conftest import need
from tests.integration.conformance import RelayConformance
from tests.integration.peers import Address, free_port, running, text

pytestmark = pytest.mark.integration


class _PortfwdRelay(RelayConformance):
    relay = "splice"
    listen_family = "v4"
    #: The splice path in C (relay/_native.c) rather than in Python (PORTFWD_NATIVE=0).
    native = False

    @contextlib.asynccontextmanager
    async def forward(self, target: Address) -> AsyncIterator[Address]:
        if self.relay == "splice":
            need(splice_available(), "needs os.splice (Linux)")
        entry: Address
        if self.listen_family == "unix":
            entry = os.path.join(tempfile.mkdtemp(prefix="pf-"), "in.sock")
        else:
            host = "::1" if self.listen_family == "v6" else "127.0.0.1"
            entry = (host, free_port(host=host))
        rule = {"listen": text(entry), "connect": text(target), "relay": self.relay, "connect_timeout": "2s"}
        if self.native:
            need(native.available(), "needs the C engine (portfwd.relay._native, built with a C compiler)")
        before = os.environ.get("PORTFWD_NATIVE")
        os.environ["PORTFWD_NATIVE"] = "1" if self.native else "0"
        try:
            async with running({"forward": [rule]}) as runtime:
                assert not runtime.failures
                kinds = {type(forwarder) for forwarder in runtime.tcp_forwarders}
                assert kinds == {NativeForwarder if self.native else TcpForwarder}
                yield entry
        finally:
            if before is None:
                os.environ.pop("PORTFWD_NATIVE", None)
            else:
                os.environ["PORTFWD_NATIVE"] = before
        if isinstance(entry, str):
            assert not os.path.exists(entry), "the Unix listener's socket file is removed"  # noqa: ASYNC240


class TestSpliceIPv4(_PortfwdRelay):
    relay = "splice"


class TestNativeIPv4(_PortfwdRelay):
    relay = "splice"
    native = True


class TestNativeIPv6(_PortfwdRelay):
    relay = "splice"
    native = True
    listen_family = "v6"
    upstream_family = "v6"


class TestProtocolIPv4(_PortfwdRelay):
    relay = "protocol"


class TestSpliceIPv6(_PortfwdRelay):
    relay = "splice"
    listen_family = "v6"
    upstream_family = "v6"


class TestProtocolIPv6(_PortfwdRelay):
    relay = "protocol"
    listen_family = "v6"
    upstream_family = "v6"


class TestSpliceUnixListenToTcp(_PortfwdRelay):
    relay = "splice"
    listen_family = "unix"


class TestProtocolTcpToUnixTarget(_PortfwdRelay):
    relay = "protocol"
    upstream_family = "unix"


class TestSpliceTcpToUnixTarget(_PortfwdRelay):
    relay = "splice"
    upstream_family = "unix"
