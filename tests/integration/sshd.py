"""A throwaway OpenSSH server on loopback (TESTBED §4): keys, known_hosts, start, kill, restart.

Started by absolute path with `-D -e` so its log is ours to read; stopped by PID only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from tests.conftest import need, need_root
from tests.integration.peers import free_port
from tests.integration.processes import Proc

SSHD = "/usr/sbin/sshd"


def keygen(path: Path, kind: str = "ed25519") -> str:
    """Make a key pair without a passphrase; return the public line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", path.name, "-f", str(path)], check=True, timeout=30
    )
    return (
        path.with_suffix(".pub").read_text().strip()
        if path.suffix
        else Path(f"{path}.pub").read_text().strip()
    )


def descendants(pid: int) -> list[int]:
    """PIDs of every process below `pid` (deepest first), read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    stack = list(parents.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(parents.get(child, []))
    return found[::-1]


class Sshd:
    """One stock sshd on 127.0.0.1:port with a fresh host key and one authorized user key."""

    def __init__(self, root: Path, extra: tuple[str, ...] = (), *, certificate: bool = False) -> None:
        need_root()
        need(os.path.exists(SSHD), "needs OpenSSH's sshd (apt-get install openssh-server)")
        need(shutil.which("ssh-keygen") is not None, "needs ssh-keygen (apt-get install openssh-client)")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.host_key = root / "host_ed25519"
        self.host_public = keygen(self.host_key)
        self.user_key = root / "id_ed25519"
        (root / "authorized_keys").write_text(keygen(self.user_key) + "\n")
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.host_public}\n")
        if certificate:  # a host certificate signed by a CA that known_hosts trusts instead
            ca_public = keygen(root / "host_ca")
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-s",
                    str(root / "host_ca"),
                    "-I",
                    "test-host",
                    "-h",
                    "-n",
                    "127.0.0.1",
                    f"{self.host_key}.pub",
                ],
                check=True,
                timeout=30,
            )
            extra = (f"HostCertificate {self.host_key}-cert.pub", *extra)
            self.known_hosts.write_text(f"@cert-authority [127.0.0.1]:{self.port} {ca_public}\n")
        self.config = root / "sshd_config"
        lines = [
            *extra,  # first: sshd takes each keyword's first value, so these override the rest
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {root / 'sshd.pid'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}",
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "AllowTcpForwarding yes",
            "AllowStreamLocalForwarding yes",
            "StreamLocalBindUnlink yes",
            "GatewayPorts clientspecified",
            "MaxStartups 200:30:400",
            "LogLevel VERBOSE",
        ]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: Proc | None = None

    def start(self) -> Sshd:
        self.proc = Proc([SSHD, "-D", "-e", "-f", str(self.config)])
        self.proc.wait_for(f"Server listening on 127.0.0.1 port {self.port}")
        return self

    def kill(self) -> None:
        """Stop the server and every session process it forked, by PID (children first)."""
        if self.proc is None:
            return
        for pid in descendants(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.stop(signal.SIGKILL)
        self.proc.close()
        self.proc = None

    def tunnel(self, **fields: object) -> dict[str, object]:
        """A [[tunnel]] table for this server, strict host keys against our known_hosts."""
        return {
            "ssh": f"root@127.0.0.1:{self.port}",
            "identity": [str(self.user_key)],
            "agent": False,
            "known_hosts": [str(self.known_hosts)],
            "ssh_config": ["/dev/null"],
            **fields,
        }

    def ssh_args(self) -> list[str]:
        """`portfwd ssh` arguments that reach this server."""
        return [
            "-F",
            "/dev/null",
            "-i",
            str(self.user_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-p",
            str(self.port),
            "root@127.0.0.1",
        ]
