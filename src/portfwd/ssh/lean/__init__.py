"""The SSH fast path and interop fixes, fenced: the only place portfwd touches asyncssh's internals.

`packets.py` and `receive.py` replace parts of asyncssh's packet path on each connection, and
`aead.py` supplies the ciphers they swap in (see each module for what and why). They mirror
asyncssh code line for line, so they are right only for the asyncssh they were checked
against. Everything outside this package reaches the fast path through one function,
`tune(conn)`, and it does nothing unless the fast path is on:

- **version guard**: on an asyncssh other than `VERIFIED`, `fast_path()` says off (and why),
  without importing the modules that reach into asyncssh; tunnels run on asyncssh's own
  path, slower but whole;
- **off switch**: the caller passes `enabled` (`ssh_fast_path = false` in the config,
  `--no-ssh-fast-path` on the command line);
- **a test that fails when asyncssh moves**: `tests/unit/test_lean_fence.py` compares the
  installed asyncssh with `VERIFIED` and the source of every function in `MIRRORED` with the
  digest it had when it was last read, and names the functions to re-read.

`kex.py` is not speed but correctness: asyncssh takes a peer's guessed first key-exchange
packet that RFC 4253 §7 says to ignore, and dropbear's client cannot log in (see there). It
has its own call, `fix(conn)`, made before the key exchange (`connection_made`), and it applies
whenever asyncssh is a VERIFIED release, fast path on or off: `ssh_fast_path = false` trades
speed for asyncssh's own packet path, and must not bring back a login failure with it. (Not
folded into `tune`, which a client calls only after `connect` returns, when the key exchange
is over.) On another asyncssh it stands aside like the fast path, and the same fence test
names what to re-read.

`forwards.py` makes a `-R` ready for its first connections before it is asked for (asyncssh
registers the listener a moment after the server starts forwarding, and refuses what comes
between): `expect_forwarded(...)`. On another asyncssh it does nothing, and that moment stays.

`sshconfig.py` reads the ssh_config keywords asyncssh skips (LocalForward, RemoteForward,
DynamicForward, ExitOnForwardFailure, ...) with asyncssh's own parser: `ssh_config(paths, host)`.
On another asyncssh it answers None and `portfwd ssh` says that ssh_config forwards are not read.

`probe.py` asks a peer once whether it is alive (`probe(conn, within)`), which asyncssh has no
public call for; the tunnel server uses it before taking a `-R` port from a session that looks
stale. On another asyncssh it answers "cannot tell", and the server keeps the port where it is.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
from importlib import metadata
from typing import Any, NamedTuple

#: The asyncssh releases the fast path and the fixes were checked against, line by line (see MIRRORED).
VERIFIED = ("2.24.1",)

#: The asyncssh code the fast path and the fixes mirror or reach into, with the sha256 (first 16
#: hex digits) of its source in the VERIFIED release. When asyncssh moves, re-read each one that
#: changed against packets.py / receive.py / aead.py / kex.py, then update the digest and VERIFIED.
MIRRORED = {
    "asyncssh.connection:SSHConnection.send_packet": "fb9da7bec6dd395a",
    "asyncssh.connection:SSHConnection._recv_data": "fc4e0735191bb0fd",
    "asyncssh.connection:SSHConnection._recv_pkthdr": "7adc4d88fe20593c",
    "asyncssh.connection:SSHConnection._recv_packet": "b3daa22e9763eee9",
    "asyncssh.connection:SSHConnection._finish_recv_packet": "e12d96db58b3524e",
    "asyncssh.connection:SSHConnection._reset_keepalive_timer": "7a9157707c514524",
    "asyncssh.connection:SSHConnection._set_keepalive_timer": "23a054202a1cb32b",
    "asyncssh.connection:SSHConnection._keepalive_timer_callback": "6d8aa6656cfc6003",
    "asyncssh.packet:SSHPacketHandler.process_packet": "490a59d971d0ce03",
    "asyncssh.encryption:GCMEncryption": "d255f9e6b1fa73ee",
    "asyncssh.encryption:ChachaEncryption": "5902581e97e59135",
    "asyncssh.logging:SSHLogger.log": "508a0a50623f9179",
    # kex.py: the handler it wraps and the KEXINIT it reads back (it also relies on _recv_packet,
    # which does the ignoring, and process_packet, which finds the per-connection handler table)
    "asyncssh.connection:SSHConnection._process_kexinit": "439bdf2fc55e6737",
    "asyncssh.connection:SSHConnection._send_kexinit": "275ddc818b59f44b",
    # kex.py finish_kexinit_first: an end of stream closes at once, a failed packet task reports
    # its error in its first done callback (registered when the task is made), closing twice is
    # a no-op once the transport is gone
    "asyncssh.connection:SSHConnection.connection_lost": "ea050d93536d711a",
    "asyncssh.connection:SSHConnection.eof_received": "49d7a5b4cee006fd",
    "asyncssh.connection:SSHConnection._reap_task": "d6d88bdf86f70401",
    "asyncssh.connection:SSHConnection._force_close": "264b4367525f4f86",
    "asyncssh.connection:SSHConnection.create_task": "a9bff2bae35cd56f",
    # probe.py: one keepalive round trip through asyncssh's ordered global-request waiters
    "asyncssh.connection:SSHConnection._make_global_request": "5f4b41f0c38aeb65",
    "asyncssh.connection:SSHConnection._report_global_response": "590a13bfd2ed513f",
    # forwards.py: the listener table a -R's stand-in joins before the request, how the request
    # replaces it, how a forwarded channel finds it, and the listener classes it makes
    "asyncssh.connection:SSHClientConnection.create_server": "45f94f4144042b45",
    "asyncssh.connection:SSHClientConnection.create_unix_server": "5c9f5324f28e8cad",
    "asyncssh.connection:SSHClientConnection._process_forwarded_tcpip_open": "4d82ef7115cfb8e3",
    "asyncssh.connection:SSHClientConnection._process_forwarded_streamlocal_at_openssh_dot_com_open": (
        "9827df1ecaa90a86"
    ),
    "asyncssh.listener:SSHTCPClientListener": "c9eef01ab28cf64a",
    "asyncssh.listener:SSHUNIXClientListener": "eef73ccbb08131c5",
    # sshconfig.py: the parser it extends with forwarding keywords, and its handler table
    "asyncssh.config:SSHConfig.parse": "8809c434443397c9",
    "asyncssh.config:SSHConfig.load": "aefeb793e46ab83a",
    "asyncssh.config:SSHClientConfig": "e561c063101f2e27",
}


class FastPath(NamedTuple):
    """Whether the fast path may run, and the one line that says why not."""

    on: bool
    reason: str


def installed_asyncssh() -> str:
    """The installed asyncssh's version ("" when its metadata cannot be read)."""
    try:
        return metadata.version("asyncssh")
    except metadata.PackageNotFoundError:
        return ""


@functools.cache
def fast_path(enabled: bool = True) -> FastPath:
    """Decide once per process: on only when enabled and asyncssh is a VERIFIED release."""
    if not enabled:
        return FastPath(False, "SSH fast path off (ssh_fast_path = false): tunnels use asyncssh's own path")
    version = installed_asyncssh()
    if version not in VERIFIED:
        return FastPath(
            False,
            f"SSH fast path off: asyncssh {version or '(unknown)'} is not the release it was checked "
            f"against ({', '.join(VERIFIED)}); tunnels use asyncssh's own, slower path",
        )
    return FastPath(True, "SSH fast path on")


def tune(conn: Any, enabled: bool) -> None:
    """Install the fast path on one asyncssh connection (client or server side), when it may run.

    `enabled` is the caller's switch; the version guard is applied here as well, so a caller
    cannot turn it on for an asyncssh it was not checked against.
    """
    if not fast_path(enabled).on:
        return
    from portfwd.ssh.lean.packets import tune as install  # reaches into asyncssh: only when verified

    install(conn)


@functools.cache
def verified() -> bool:
    """Is the installed asyncssh a VERIFIED release (decided once per process)?"""
    return installed_asyncssh() in VERIFIED


def fix(conn: Any) -> bool:
    """Install the interop fixes on one asyncssh connection, before its key exchange begins.

    Applied whenever asyncssh is VERIFIED, whatever the fast-path switch says (see the module
    docstring); False unless both were installed (another asyncssh, or not a connection of
    the kind checked). Raises nothing.
    """
    if not verified():
        return False
    from portfwd.ssh.lean.kex import finish_kexinit_first
    from portfwd.ssh.lean.kex import fix as judge_guesses  # reaches into asyncssh: only when verified

    judged = judge_guesses(conn)
    return finish_kexinit_first(conn) and judged


def changed() -> list[str]:
    """The MIRRORED names whose source differs from the digest recorded (or is gone)."""
    moved = []
    for name, digest in MIRRORED.items():
        module_name, _, attribute = name.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
            source = inspect.getsource(target)
        except (ImportError, AttributeError, OSError, TypeError):
            moved.append(f"{name} (gone)")
            continue
        if hashlib.sha256(source.encode()).hexdigest()[:16] != digest:
            moved.append(name)
    return moved


def expect_forwarded(
    conn: Any, factory: Any, host: str | None, port: int, path: str | None, window: int, packet: int
) -> Any:
    """Make `conn` take forwarded channels for a -R (host:port or path) before it is requested.

    Returns the undo to call when the request fails (a no-op when asyncssh's own listener took
    over). Does nothing on an asyncssh that is not VERIFIED, or for port 0 (no port known yet).
    """
    if not verified() or (path is None and port == 0):
        return lambda: None
    from portfwd.ssh.lean.forwards import expect  # reaches into asyncssh: only when verified

    return expect(conn, factory, host, port, path, window, packet)


def ssh_config(paths: list[str], host: str) -> dict[str, Any] | None:
    """What ssh_config `paths` set for `host` among sshconfig.NAMES; None on an asyncssh that is
    not VERIFIED (nothing read). Raises OSError, or ValueError naming the file and line."""
    if not verified():
        return None
    from portfwd.ssh.lean.sshconfig import read  # reaches into asyncssh: only when verified

    return read(paths, host)


def accept_time_formats() -> None:
    """Have asyncssh read ssh_config's ServerAliveInterval and ConnectTimeout in OpenSSH's time
    format (`1m`), as ssh does, before a connect reads the files; nothing on an asyncssh that
    is not VERIFIED (such a line is then refused there, naming file and line)."""
    if not verified():
        return
    from portfwd.ssh.lean import sshconfig  # reaches into asyncssh: only when verified

    sshconfig.accept_time_formats()


async def probe(conn: Any, within: float) -> bool | None:
    """Does `conn`'s peer answer a keepalive within `within` s? None when it cannot be asked
    (an asyncssh that is not VERIFIED): the caller must then assume the peer is alive."""
    if not verified():
        return None
    from portfwd.ssh.lean.probe import answers  # reaches into asyncssh: only when verified

    return await answers(conn, within)
