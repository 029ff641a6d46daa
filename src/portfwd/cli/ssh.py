"""`portfwd ssh`: OpenSSH's client command line, run by portfwd's engine (or `-W`, stdio).

Apart from commands.py because it is the biggest command and the one people compare with `ssh`:
its flags, the `-v` levels, `-W` and `-f`. The arguments become a plan in sshargs.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from portfwd import instances
from portfwd.cli import logging_options
from portfwd.cli.console import setup_logging
from portfwd.errors import RuntimeFailure

if TYPE_CHECKING:
    pass

from portfwd.cli.options import control_option, fast_path_option


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("destination", metavar="[user@]host[:port]")
@click.option(
    "-L", "local", multiple=True, metavar="SPEC", help="[bind:]port:host:hostport (or socket paths)."
)
@click.option(
    "-R", "remote", multiple=True, metavar="SPEC", help="[bind:]port:host:hostport, or [bind:]port for SOCKS."
)
@click.option("-D", "dynamic", multiple=True, metavar="SPEC", help="[bind:]port: a SOCKS 4/4a/5 server.")
@click.option("-p", "port", type=int, metavar="PORT", help="SSH server port.")
@click.option("-l", "login", metavar="USER", help="User to log in as (as user@host).")
@click.option("-i", "identity", multiple=True, metavar="KEY", help="Private key file (repeatable).")
@click.option("-J", "jump", metavar="JUMP", help="Jump host(s): [user@]host[:port][,...].")
@click.option("-o", "options", multiple=True, metavar="Key=Value", help="OpenSSH option (see below).")
@click.option(
    "-F",
    "ssh_config",
    metavar="FILE",
    help="ssh_config file instead of ~/.ssh/config and /etc/ssh/ssh_config (none: no file).",
)
@click.option("-C", "compression", is_flag=True, help="Compress (Compression=yes).")
@click.option("-N", "no_command", is_flag=True, help="Accepted for ssh compatibility: never runs a command.")
@click.option("-T", "no_tty", is_flag=True, help="Accepted for ssh compatibility: never asks for a terminal.")
@click.option("-n", "no_stdin", is_flag=True, help="Accepted for ssh compatibility: ignored.")
@click.option("-g", "gateway_ports", is_flag=True, help="-L/-D without an address listen on every address.")
@click.option("-4", "family", flag_value="4", help="IPv4 only (the connection and the listeners).")
@click.option("-6", "family", flag_value="6", help="IPv6 only.")
@click.option("-f", "background", is_flag=True, help="Go to the background once the forwards are up.")
@click.option("-E", "log_file", metavar="FILE", help="Append the log to FILE instead of stderr.")
@click.option("-W", "stdio", metavar="HOST:PORT", help="Join stdin/stdout to HOST:PORT (a ProxyCommand).")
@click.option(
    "--retry-first-connect",
    "retry_first",
    is_flag=True,
    help="Retry even when the first connect fails for good (autossh's AUTOSSH_GATETIME=0).",
)
@click.option(
    "--name",
    metavar="NAME",
    help="Name this instance (default: ssh-PID) and its tunnel (default: the destination).",
)
@control_option
@fast_path_option
@logging_options
def ssh(
    destination: str,
    local: tuple[str, ...],
    remote: tuple[str, ...],
    dynamic: tuple[str, ...],
    port: int | None,
    login: str | None,
    identity: tuple[str, ...],
    jump: str | None,
    options: tuple[str, ...],
    ssh_config: str | None,
    compression: bool,
    no_command: bool,
    no_tty: bool,
    no_stdin: bool,
    gateway_ports: bool,
    family: str | None,
    background: bool,
    log_file: str | None,
    stdio: str | None,
    retry_first: bool,
    name: str | None,
    control_socket: str | None,
    no_fast_path: bool,
    verbose: int,
    quiet: bool,
    log_format: str,
) -> None:
    """OpenSSH-style tunnels that reconnect by themselves: portfwd ssh [user@]host -L/-R/-D SPEC.

    -o understands ServerAliveInterval, ServerAliveCountMax, ExitOnForwardFailure,
    StrictHostKeyChecking (yes, accept-new), UserKnownHostsFile, GlobalKnownHostsFile,
    ConnectTimeout, Compression,
    Ciphers, KexAlgorithms, MACs, HostKeyAlgorithms (each narrows portfwd's safe set), Port, User,
    IdentityFile, IdentitiesOnly, ProxyJump, BatchMode, GatewayPorts (as -g) and AddressFamily
    (any, inet, inet6: as -4/-6), and takes the ones a forwarding-only client has no use for
    (TCPKeepAlive, LogLevel, ControlMaster, ...) as doing nothing; ssh_config's LocalForward,
    RemoteForward, DynamicForward and those options apply when the command line leaves them out.
    -v shows the SSH conversation (-vv, -vvv: more of it, as ssh).
    """
    # -W is a ProxyCommand: its stderr is the user's terminal, so only problems unless -v.
    setup_logging(verbose, quiet or (stdio is not None and not verbose), log_format, log_file)
    if verbose:
        _ssh_verbosity(verbose)
    target = _stdio_target(stdio) if stdio is not None else None
    instance = instances.identify("ssh", name=name, control=control_socket)
    from portfwd import planner
    from portfwd.cli import sshargs

    found = sshargs.read_ssh_config(destination, ssh_config)
    config = sshargs.tunnel_from_args(
        destination,
        local,
        remote,
        dynamic,
        port,
        identity,
        jump,
        options,
        ssh_config,
        compression,
        name,
        login=login,
        found=found,
        stdio=target is not None,
    )
    plan = planner.plan(config)
    batch = sshargs.batch_mode(options)
    batch = bool(found.get("BatchMode")) if batch is None else batch
    gateway_ports, family = sshargs.listen_flags(options, found, gateway_ports, family)
    wanted = sshargs.FAMILIES.get(family or "", 0)
    plan = replace(
        plan,
        tunnels=tuple(
            sshargs.with_keys(
                sshargs.with_flags(
                    tunnel, gateway_ports=gateway_ports, family=wanted, retry_first=retry_first
                ),
                batch=batch,
            )
            for tunnel in plan.tunnels
        ),
    )
    if no_fast_path:
        plan = replace(plan, ssh_fast_path=False)
    if target is not None:
        from portfwd.ssh import stdio as stdio_relay

        stdio_relay.run(sshargs.stdio_spec(plan.tunnels[0]), *target, fast_path=plan.ssh_fast_path)
        return
    if background:
        tunnel = plan.tunnels[0]
        _background(
            instance.socket,
            tunnel.connect_timeout,
            tunnel.label,
            keep_stderr=verbose > 0,
            all_or_nothing=tunnel.exit_on_forward_failure,
        )
    from portfwd import runtime

    runtime.run(plan, identity=instance, exit_on_auth=True)


def _quiet_when_gone(parent_gone: int, child_here: int, keep_stderr: bool) -> None:
    """The -f child: once the parent is leaving (its end of the pipe closed, or it died), the
    lines logged so far are written and stderr goes to /dev/null unless -v kept it (the log
    file of -E is not stderr and stays); closing `child_here` tells the parent it may exit."""
    with contextlib.suppress(OSError):
        while os.read(parent_gone, 1):  # the parent never writes: this returns as it leaves
            pass
    os.close(parent_gone)
    from portfwd.cli import logwriter

    logwriter.flush()  # what the child logged while the parent waited goes out first
    if not keep_stderr:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    os.close(child_here)


def _ssh_verbosity(verbose: int) -> None:
    """ssh's -v levels for the SSH conversation: -v asyncssh's narration (connect, auth,
    channels), -vv and -vvv its debug levels 1 and 2 (ssh's debug1..3 in spirit)."""
    import asyncssh

    logging.getLogger("asyncssh").setLevel(logging.INFO if verbose == 1 else logging.DEBUG)
    if verbose > 1:
        asyncssh.set_debug_level(min(verbose - 1, 3))


def _stdio_target(text: str) -> tuple[str, int]:
    """-W host:port (IPv6 in brackets). Raises UsageError."""
    from portfwd.errors import UsageError

    host, colon, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(
            f"{text!r} is not host:port", field="-W", hint="e.g. -W db.internal:5432 or -W %h:%p"
        )
    return host, int(port)


#: A forward's states once it has settled: listening, or failed with its line logged (a -L or
#: -D that cannot listen stays down; a refused -R is asked for again).
SETTLED = ("listening", "failed", "refused")
#: How long the parent waits for the child to have written its lines and let go of stderr.
HANDOVER_WAIT = 2.0


def _background(
    control: Path, within: float, label: str, *, keep_stderr: bool = False, all_or_nothing: bool = False
) -> None:
    """-f: fork; the child runs on (in a session of its own, stdin and stdout on /dev/null),
    the parent exits 0 once the child's control socket says the tunnel is up and every forward
    has settled (listening, or failed with its line logged, as ssh goes to the background
    after a forward it could not set up), or, with ExitOnForwardFailure (`all_or_nothing`),
    once every forward listens: a failure ends the child, whose exit code the parent returns.

    Then the parent hands over: it closes its end of one pipe, the child writes the lines it
    has logged, puts /dev/null on its stderr too (as ssh -f's, unless -v keeps it) and closes
    its end of another, and the parent exits. So every line comes before the prompt, and
    `$(portfwd ssh -f ...)`, a pipe or a captured run ends. A signal to the parent while it
    waits (Ctrl-C) ends the child too, as it ends ssh before it goes to the background.

    The parent waits at most `within` (ConnectTimeout) plus a little for the start; if the
    child exits first, the parent exits with its code (the child has printed why). Raises
    RuntimeFailure (exit 1) when the tunnel is not up in time: the child keeps trying.
    """
    from portfwd import control as control_client

    parent_gone, parent_here = os.pipe()
    child_done, child_here = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: detach from the terminal and run
        os.close(parent_here)
        os.close(child_done)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        watcher = threading.Thread(
            target=_quiet_when_gone,
            args=(parent_gone, child_here, keep_stderr),
            name="portfwd -f",
            daemon=True,
        )
        watcher.start()
        return
    os.close(parent_gone)
    os.close(child_here)

    def stop_child(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop_child)
    settled = ("listening",) if all_or_nothing else SETTLED
    deadline = time.monotonic() + within + 5
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            os._exit(os.waitstatus_to_exitcode(status))
        try:
            answer = control_client.request(control, "status", timeout=2)
        except RuntimeFailure:
            answer = {}
        tunnels = answer.get("status", {}).get("tunnels", []) if answer.get("ok") else []
        if (
            tunnels
            and tunnels[0].get("state") == "up"
            and all(item.get("state") in settled for item in tunnels[0].get("forwards", []))
        ):
            os.close(parent_here)  # the child's turn: its lines out, then stderr let go
            select.select([child_done], [], [], HANDOVER_WAIT)
            os._exit(0)
        time.sleep(0.05)  # polling another process's socket; bounded by the deadline
    raise RuntimeFailure(
        f"{label}: not up within {within:g}s; it keeps trying in the background (pid {pid})",
        hint=f"see portfwd status --control {control}",
    )
