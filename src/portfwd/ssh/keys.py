"""A tunnel's private key files (`-i`, `identity`): read once, checked as OpenSSH checks them.

`load` reads each file before any connection is tried, so that what is wrong with a key is one
line naming the file, not a reconnect loop: a missing file (exit 2), a key readable by group or
others (refused like OpenSSH's "UNPROTECTED PRIVATE KEY FILE", exit 2), a passphrase-protected key
(asked for once on the terminal, as ssh asks; skipped when the agent holds the key; one line,
exit 1, in batch mode or with no terminal), a wrong passphrase (three tries, as ssh).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import stat
import termios
from collections.abc import Callable
from typing import Any

import asyncssh

from portfwd.errors import ConfigError, RuntimeFailure
from portfwd.proto import opensshkey

__all__ = ["Ask", "KeyFileError", "KeyLoginError", "ask_on_terminal", "identities", "load", "public_half"]

#: Asks a person for a key's passphrase (the prompt, then the answer); None: nobody to ask.
Ask = Callable[[str], str | None]

#: How an OpenSSH-format private key file begins (ssh-keygen's default format).
OPENSSH_FORMAT = b"-----BEGIN OPENSSH PRIVATE KEY-----"

#: How many passphrases a person may try for one key (OpenSSH's NumberOfPasswordPrompts).
TRIES = 3


class KeyFileError(ConfigError):
    """A key file that cannot be used as given: missing, unreadable, not a key, too open (exit 2)."""


class KeyLoginError(RuntimeFailure):
    """A key that needs a passphrase nobody can give here, or whose passphrase was wrong (exit 1)."""


def ask_on_terminal(prompt: str) -> str | None:
    """Read a passphrase from the controlling terminal with echo off, as ssh does; None without one.

    /dev/tty rather than stdin: stdin may be a pipe (a ProxyCommand, -W) while a person is there.
    """
    try:
        tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return None
    with os.fdopen(tty, "r+b", buffering=0) as terminal:
        try:
            before = termios.tcgetattr(tty)
        except termios.error:
            return None
        quiet = list(before)
        quiet[3] &= ~termios.ECHO
        try:
            termios.tcsetattr(tty, termios.TCSAFLUSH, quiet)  # echo off before the prompt shows
            terminal.write(prompt.encode())
            line = b""
            while not line.endswith(b"\n") and len(line) < 4096:  # a line, bounded
                chunk = terminal.read(1)
                if not chunk:
                    break
                line += chunk
        finally:
            termios.tcsetattr(tty, termios.TCSAFLUSH, before)
            terminal.write(b"\n")
    return line.rstrip(b"\r\n").decode(errors="replace")


def _check_file(path: str, field: str) -> bytes:
    """The key file's bytes, after OpenSSH's checks. Raises KeyFileError."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise KeyFileError(
            f"{path}: no such key file", field=field, hint="give an existing private key"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}", field=field) from exc
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: not a regular file", field=field, hint="give a private key file")
    if info.st_uid == os.getuid() and info.st_mode & 0o077 and not public_key_file(path):
        raise KeyFileError(
            f"UNPROTECTED PRIVATE KEY FILE {path}: permissions {stat.S_IMODE(info.st_mode):04o} are too open "
            "(a private key must not be readable by group or others)",
            field=field,
            hint=f"chmod 600 {path}",
        )
    try:
        with open(path, "rb") as handle:
            return handle.read(1 << 20)  # a private key is a few KB; bounded
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}", field=field) from exc


def public_half(path: str, data: bytes | None = None) -> bytes | None:
    """The public key of the private key file `path` (its bytes `data`, when read already), as
    ssh finds it: `path`.pub, else the key itself when it is not encrypted, else the public key
    an OpenSSH-format file keeps in the clear; None when none of them can be read."""
    with contextlib.suppress(OSError, ValueError):
        return bytes(asyncssh.read_public_key(path + ".pub").public_data)
    if public_key_file(path):  # the file named is the public key itself
        return bytes(asyncssh.read_public_key(path).public_data)
    if data is None:
        try:
            with open(path, "rb") as handle:
                data = handle.read(1 << 20)
        except OSError:
            return None
    with contextlib.suppress(ValueError):  # encrypted (or not a key): the clear part, if any
        return bytes(asyncssh.import_private_key(data).public_data)
    return opensshkey.public_blob(data)


def public_key_file(path: str) -> bool:
    """Is `path` a public key (`IdentityFile ~/.ssh/id_ed25519.pub`, whose private half only the
    agent holds: a hardware key, a password manager's agent)? Such a file may be world-readable."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)
        asyncssh.import_public_key(data)  # (which takes a private key too: its public half)
    except (OSError, ValueError):
        return False
    return b"PRIVATE KEY" not in data


def _agent_holds(path: str, agent_path: str, data: bytes | None = None) -> bool:
    """Does the ssh-agent at `agent_path` hold the key in file `path` (`public_half`)?"""
    public = public_half(path, data)
    if public is None:
        return False

    async def ask() -> bool:
        agent = await asyncssh.connect_agent(agent_path)
        try:
            async with asyncio.timeout(5):
                keys = await agent.get_keys()
            return any(public in (key.key_public_data, key.public_data) for key in keys)
        finally:
            agent.close()
            with contextlib.suppress(Exception):
                await agent.wait_closed()

    try:
        return asyncio.run(ask())
    except (OSError, ValueError, TimeoutError, asyncssh.Error):
        return False


def identities(paths: tuple[str, ...]) -> list[bytes]:
    """What IdentitiesOnly=yes lets the agent offer: the public halves of the keys in `paths`
    (`public_half`) and of their `-cert.pub` certificates, or of the default key files when
    `paths` is empty. A key whose public half cannot be read is skipped, as ssh skips it. An
    empty list would let asyncssh offer every agent key; a value no agent key has stands in
    for none."""
    found: list[bytes] = []
    for given in paths or _DEFAULT_KEYS:
        path = os.path.expanduser(given)
        public = public_half(path)
        if public is not None:
            found.append(public)
        with contextlib.suppress(OSError, ValueError):
            found.append(bytes(asyncssh.read_certificate(path + "-cert.pub").public_data))
    return found or [b"none"]


#: ssh's default identity files (ssh_config(5) IdentityFile), in its order.
_DEFAULT_KEYS = (
    "~/.ssh/id_rsa",
    "~/.ssh/id_ecdsa",
    "~/.ssh/id_ecdsa_sk",
    "~/.ssh/id_ed25519",
    "~/.ssh/id_ed25519_sk",
)


def _pair(key: asyncssh.SSHKey, path: str) -> list[Any]:
    """The key (with its `-cert.pub` certificate, when there is one) as asyncssh key pairs."""
    cert = path + "-cert.pub"
    item: Any = (key, cert) if os.path.exists(cert) else key
    try:
        return list(asyncssh.load_keypairs([item]))
    except (OSError, ValueError):  # a bad certificate: the key alone, as ssh goes on without it
        return list(asyncssh.load_keypairs([key]))


def load(
    paths: tuple[str, ...],
    *,
    field: str,
    agent: bool = True,
    batch: bool = False,
    ask: Ask | None = None,
) -> tuple[Any, ...]:
    """Read every key in `paths` (~ expanded) into asyncssh key pairs, in order.

    A passphrase-protected key the agent holds is left to the agent; otherwise `ask` is asked
    for its passphrase (never when `batch`). With `ask` None (the engine, unattended, inside
    its event loop) such a key is left to the agent when there is one, without asking it.
    `field` names the option in errors (`-i`, `tunnel[0].identity`). Raises KeyFileError
    (exit 2) or KeyLoginError (exit 1).
    """
    agent_path = os.environ.get("SSH_AUTH_SOCK", "") if agent else ""
    pairs: list[Any] = []
    for given in paths:
        path = os.path.expanduser(given)
        data = _check_file(path, field)
        if public_key_file(path):  # the agent holds its private half, or nobody here does
            if not agent_path:
                raise KeyFileError(
                    f"{path}: a public key, and no ssh-agent to sign with its private half",
                    field=field,
                    hint="add the key to the agent (SSH_AUTH_SOCK) or give the private key file",
                )
            continue
        try:
            pairs.extend(_pair(asyncssh.import_private_key(data), path))
            continue
        except asyncssh.KeyImportError as exc:
            if not str(exc).startswith("Passphrase"):
                raise KeyFileError(f"{path}: not a private key ({exc})", field=field) from exc
        if agent_path and (ask is None or _agent_holds(path, agent_path, data)):
            continue  # the agent signs with it (or may: nobody to ask here), as with ssh
        if data.lstrip().startswith(OPENSSH_FORMAT) and importlib.util.find_spec("bcrypt") is None:
            # asyncssh decrypts this format (ssh-keygen's default) only with bcrypt's KDF: say so
            # before asking for a passphrase that could not be used.
            raise KeyLoginError(
                f"{path}: a passphrase-protected key in OpenSSH format needs Python's bcrypt module, "
                "which is not installed",
                field=field,
                hint=f"install it (pip install bcrypt), or add the key to the agent first (ssh-add {path})",
            )
        pairs.extend(_pair(_decrypt(data, path, field, batch, ask), path))
    return tuple(pairs)


def _decrypt(data: bytes, path: str, field: str, batch: bool, ask: Ask | None) -> asyncssh.SSHKey:
    """The key in `data`, decrypted with a passphrase from `ask`. Raises KeyLoginError."""
    hint = f"add it to the agent first (ssh-add {path}) or run portfwd ssh on a terminal"
    if batch:
        raise KeyLoginError(
            f"{path}: the key needs a passphrase and BatchMode=yes forbids asking", field=field, hint=hint
        )
    for _ in range(TRIES):
        passphrase = ask(f"Enter passphrase for key '{path}': ") if ask is not None else None
        if passphrase is None:
            raise KeyLoginError(
                f"{path}: the key needs a passphrase and there is no terminal to ask on",
                field=field,
                hint=hint,
            )
        try:
            return asyncssh.import_private_key(data, passphrase)
        except (asyncssh.KeyEncryptionError, asyncssh.KeyImportError):
            continue
    raise KeyLoginError(f"{path}: wrong passphrase ({TRIES} tries)", field=field)
