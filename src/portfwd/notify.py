"""sd_notify(3) for Type=notify services: READY, RELOADING and STOPPING as one datagram each.

systemd (or any supervisor speaking its protocol) passes `$NOTIFY_SOCKET`, a Unix datagram
socket path, or an abstract-namespace name written with a leading "@". Each state change is
one datagram of newline-separated `KEY=VALUE` lines. Without `$NOTIFY_SOCKET` nothing is sent,
so the same code runs under systemd, under another supervisor and in a terminal. Standard
library only: no libsystemd, no python-systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

#: The environment variable systemd sets for Type=notify services (and NotifyAccess=).
ENVIRONMENT = "NOTIFY_SOCKET"


def address(environ: Mapping[str, str]) -> str | None:
    """The socket address `environ` names, in the form `socket.sendto` takes, or None.

    "@name" is the abstract name "\\0name"; a relative path, or a kind of address other than a
    Unix socket (systemd's "vsock:"), is not ours to guess at: None, and a debug line.
    """
    where = environ.get(ENVIRONMENT, "")
    if not where:
        return None
    if where.startswith("@"):
        return "\0" + where[1:]
    if where.startswith("/"):
        return where
    log.debug("%s=%s is not a Unix socket path; not notifying", ENVIRONMENT, where)
    return None


def _line(value: str) -> str:
    """One value on one line: the protocol is newline-separated, so a newline would forge a key."""
    return " ".join(value.split())


class Notifier:
    """Tells the service manager portfwd's state; does nothing when none asked to be told.

    Sending is best effort: a manager that went away must not stop portfwd, so an OSError is
    logged once (a warning) and later messages are still tried.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.address = address(os.environ if environ is None else environ)
        self._warned = False
        #: READY=1 has been sent: a reload before that (a SIGHUP while starting) is not told,
        #: so that the first READY=1 still means every listener is up.
        self.started = False

    @property
    def enabled(self) -> bool:
        """Whether a manager asked to be notified ($NOTIFY_SOCKET was set)."""
        return self.address is not None

    def ready(self, status: str) -> bool:
        """Every listener is up: READY=1 with STATUS= (what runs)."""
        self.started = True
        return self.send(f"READY=1\nSTATUS={_line(status)}")

    def reloading(self) -> bool:
        """A reload begins: RELOADING=1 stamped with CLOCK_MONOTONIC; reloaded() ends it."""
        if not self.started:
            return False
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the config")

    def reloaded(self, status: str) -> bool:
        """A reload ended, applied or refused: READY=1 again (nothing if never ready)."""
        return self.ready(status) if self.started else False

    def stopping(self) -> bool:
        """Stopping: no longer accepting, sessions draining."""
        return self.send("STOPPING=1\nSTATUS=stopping: draining sessions")

    def send(self, message: str) -> bool:
        """Send one datagram; True when one was sent, False when disabled or the send failed."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
                notify.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                shown = self.address.replace("\0", "@", 1)
                log.warning("cannot notify the service manager at %s: %s", shown, exc.strerror or exc)
            return False
        return True
