"""Host-key checking against OpenSSH known_hosts files, with answers a person can act on.

asyncssh does the matching (hashed entries, `[host]:port`, patterns, `@cert-authority`,
`@revoked`); this module adds what it leaves to the caller: the files ssh reads (the user's
UserKnownHostsFile, then the GlobalKnownHostsFile an admin keeps, /etc/ssh/ssh_known_hosts),
StrictHostKeyChecking=accept-new (record a first key in the user's first file, under a hash of
the host's name with HashKnownHosts=yes, as ssh writes it), and the exact
file and line to fix when a key has changed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
from pathlib import Path

import asyncssh

from portfwd import sshalgorithms
from portfwd.errors import RuntimeFailure
from portfwd.logevents import event

log = logging.getLogger(__name__)


class HostKeyError(RuntimeFailure):
    """The server's host key is unknown or changed: never connected, never retried blindly."""


def _entry_name(host: str, port: int) -> str:
    return host if port in (0, 22) else f"[{host}]:{port}"


def hashed_name(name: str, salt: bytes | None = None) -> str:
    """A known_hosts name as ssh writes it with HashKnownHosts (`|1|salt|HMAC-SHA1(salt, name)`,
    both base64): the file no longer lists the hosts a user reaches."""
    salt = os.urandom(20) if salt is None else salt
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


class HostKeyCheck:
    """Verifies one server's key for one connection attempt; `problem` says why it was refused."""

    def __init__(
        self,
        files: list[str],
        accept_new: bool,
        chosen: tuple[str, ...] = (),
        global_files: tuple[str, ...] = (),
        hashed: bool = False,
    ) -> None:
        self.files = [Path(os.path.expanduser(item)) for item in files]  # the user's: written too
        self.global_files = [Path(os.path.expanduser(item)) for item in global_files]  # read only
        self.accept_new = accept_new
        self.hashed = hashed  # HashKnownHosts: record a new key under a hash of the name
        self.chosen = chosen  # host_key_algorithms from the config; () is the whole safe set
        self.problem: HostKeyError | None = None

    def _lines(self) -> list[tuple[Path, int, str]]:
        lines: list[tuple[Path, int, str]] = []
        for path in (*self.files, *self.global_files):
            with contextlib.suppress(OSError):
                for number, line in enumerate(
                    path.read_text(encoding="utf-8", errors="replace").splitlines(), 1
                ):
                    stripped = line.strip()
                    if stripped and not stripped.startswith("#"):
                        lines.append((path, number, stripped))
        return lines

    def known_hosts(self) -> asyncssh.SSHKnownHosts:
        """Every readable file merged. A line asyncssh cannot read in the user's files is refused
        naming file:line; in a global file (the admin's, which the user cannot fix) it is skipped
        with a warning, as ssh skips it."""
        lines = self._lines()
        try:
            return asyncssh.import_known_hosts("\n".join(line for _, _, line in lines) + "\n")
        except (ValueError, asyncssh.KeyImportError):
            pass
        kept: list[str] = []
        for path, number, line in lines:
            try:
                asyncssh.import_known_hosts(line + "\n")
            except (ValueError, asyncssh.KeyImportError) as exc:
                if path in self.files:
                    raise HostKeyError(
                        f"{path}:{number}: not a known_hosts line ({exc})", hint="fix or delete that line"
                    ) from exc
                log.warning("%s:%d: not a known_hosts line (%s); skipped", path, number, exc)
                continue
            kept.append(line)
        return asyncssh.import_known_hosts("\n".join(kept) + "\n")

    def _own(self) -> str:
        """The user's known_hosts file a key goes in (ssh's default when none is given)."""
        return str(self.files[0]) if self.files else "~/.ssh/known_hosts"

    def _read(self) -> str:
        """The files looked in, for a message: the user's, and the global ones that exist."""
        files = [*self.files, *(path for path in self.global_files if path.exists())]
        return ", ".join(map(str, files)) if files else "any known_hosts file: none is given"

    def host_key_algorithms(
        self, known: asyncssh.SSHKnownHosts, host: str, port: int | None, config: object
    ) -> list[str]:
        """What to offer this server: the key types `known` holds for it first (as OpenSSH does).

        Without this an RSA-only entry would fail once ed25519 is preferred. The name is looked up
        as asyncssh will look it up: after ssh_config's Hostname, Port and HostKeyAlias.
        """
        algorithms = sshalgorithms.offered("host_key_algorithms", self.chosen)
        names = asyncssh.SSHClientConnectionOptions(
            host=host, port=port or (), config=config, known_hosts=None, client_keys=None, agent_path=None
        )
        at = names.port if names.port != 22 else None
        keys, authorities, *_ = known.match(names.host_key_alias or names.host, "", at)
        types = {key.get_algorithm() for key in keys}
        return sshalgorithms.host_key_order(algorithms, types, bool(authorities))

    def validate(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        """asyncssh asks this about a key no known_hosts entry trusts: accept-new, or refuse why."""
        name = _entry_name(host, port)
        offered = f"{key.get_algorithm()} {key.get_fingerprint()}"
        for path, number, line in self._lines():
            try:
                entry = asyncssh.import_known_hosts(line + "\n")
                host_keys, *_ = entry.match(host, addr, port)
            except (ValueError, asyncssh.KeyImportError):
                continue
            if host_keys:
                if path in self.files:
                    hint = f"if the change is expected, delete line {number} of {path} "
                    hint += f"(ssh-keygen -R '{name}' -f {path})"
                else:  # the admin's file, as ssh says it: the right key goes in the user's own
                    hint = f"if the change is expected, add the new key to {self._own()} "
                    hint += f"(ssh-keyscan -p {port or 22} {host} >> {self._own()}), or have {path} fixed"
                self.problem = HostKeyError(
                    f"host key for {name} has CHANGED (server offers {offered}; "
                    f"{path}:{number} holds another); refusing to connect",
                    hint=hint,
                )
                return False
        if not self.accept_new or not self.files:
            where = self._own()
            hint = f"add it to {where} (ssh-keyscan -p {port or 22} {host} >> {where})"
            if not self.files:
                hint += " and give that file as UserKnownHostsFile"
            elif not self.accept_new:
                hint += " or use -o StrictHostKeyChecking=accept-new"
            self.problem = HostKeyError(
                f"host key for {name} is unknown ({offered}; not in {self._read()})", hint=hint
            )
            return False
        target = self.files[0]
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("a", encoding="utf-8") as handle:
                written = hashed_name(name) if self.hashed else name
                handle.write(f"{written} {key.export_public_key().decode().strip()}\n")
        except OSError as exc:
            self.problem = HostKeyError(f"cannot record the host key of {name} in {target}: {exc.strerror}")
            return False
        log.warning(
            "recorded new host key for %s in %s: %s",
            name,
            target,
            offered,
            extra=event("hostkey.recorded", host=name, file=str(target), key=str(offered)),
        )
        return True
