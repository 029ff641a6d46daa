"""Dropping root after binding: become `user`, for good, and leave nothing behind at exit.

portfwd binds low ports and root-owned socket paths as root, then becomes `user`. The drop is
made one-way the way OpenSSH's privilege separation makes it: the capability bounding set is
emptied (no file capability or setuid binary can hand a capability back) and no_new_privs is
set (execve can never raise privileges again), then setgroups/setgid/setuid, and a check that
root cannot be regained. Files made as root in directories the new user cannot write (the
control socket in /run/portfwd, Unix listeners) are handed to a janitor process started just
before the drop (janitor.py), which removes them once portfwd has exited, however it exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import json
import logging
import os
import pwd
import socket
import stat
import subprocess
import sys
from pathlib import Path

from portfwd.errors import RuntimeFailure
from portfwd.logevents import event
from portfwd.relay import libc

log = logging.getLogger(__name__)

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38


def _preload() -> None:
    """Import what Python and uvloop load lazily, while files root can read are still readable.

    After the drop the interpreter may sit in a directory the new user cannot enter (pyenv under
    /root); a lazy import then would fail on the first connection (`unknown encoding: idna`).
    """
    "localhost".encode("idna")
    with contextlib.suppress(OSError):
        socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)


class Janitor:
    """The process that removes root-made files after portfwd exits (see janitor.py)."""

    def __init__(self, files: list[str], dirs: list[str]) -> None:
        plan: dict[str, list[object]] = {"files": [], "dirs": list(dirs)}
        for path in files:
            with contextlib.suppress(OSError):
                found = os.lstat(path)
                if stat.S_ISSOCK(found.st_mode):
                    plan["files"].append([path, found.st_dev, found.st_ino])
        read_end, self._write_end = os.pipe()
        try:
            self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-m", "portfwd.janitor", str(read_end), json.dumps(plan)],
                pass_fds=(read_end,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # not in portfwd's process group: a Ctrl-C passes it by
                close_fds=True,
            )
        finally:
            os.close(read_end)
        os.set_inheritable(self._write_end, False)

    def finish(self, within: float = 5.0) -> None:
        """portfwd is done: let the janitor clean now, and wait for it (bounded)."""
        if self._process is None:
            return
        os.close(self._write_end)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(within)
        self._process = None


def _bounding_set_dropped() -> bool:
    """Empty the capability bounding set (needs CAP_SETPCAP, which root has). False if impossible."""
    prctl = libc.function(
        "prctl", (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    )
    if prctl is None:
        return False
    try:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        last = 40
    return all(prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0 for cap in range(last + 1))


def _no_new_privileges() -> bool:
    prctl = libc.function(
        "prctl", (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    )
    return prctl is not None and prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0


def drop_privileges(
    user: str, group: str | None, owned: list[str] | None = None, made_dirs: list[str] | None = None
) -> Janitor | None:
    """Become `user` (and `group`, else the user's primary group) after binding as root.

    The socket files in `owned` (and the directories in `made_dirs`, when empty) are removed
    after exit by the returned Janitor; call its `finish()` last. Raises RuntimeFailure when the
    user/group is unknown, when not started as root, or when root could be regained afterwards.
    """
    try:
        entry = pwd.getpwnam(user)
    except KeyError as exc:
        raise RuntimeFailure(f"no such user {user!r}", field="user", hint="name an existing account") from exc
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError as exc:
            raise RuntimeFailure(f"no such group {group!r}", field="group") from exc
    if os.geteuid() == entry.pw_uid:
        return None
    if os.geteuid() != 0:
        raise RuntimeFailure(
            f"switching to user {user!r} needs portfwd started as root",
            field="user",
            hint="start as root, or remove user = and use CAP_NET_BIND_SERVICE",
        )
    _preload()
    janitor = Janitor(list(owned or []), list(made_dirs or []))
    for path in owned or []:
        with contextlib.suppress(OSError):
            os.chown(path, entry.pw_uid, -1)  # its group stays ([control] group); sticky dirs ask the owner
    bounded = _bounding_set_dropped()
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(entry.pw_uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - would mean the kernel ignored setuid
        raise RuntimeFailure("privilege drop failed: root could be regained", field="user")
    sealed = _no_new_privileges()
    log.info(
        "dropped privileges to user %s (uid %d, gid %d)%s%s",
        user,
        entry.pw_uid,
        gid,
        "; no capabilities can come back" if bounded else "; WARNING: capability bounding set kept",
        "; no_new_privs set" if sealed else "; WARNING: no_new_privs not set",
        extra=event(
            "privileges.dropped", user=user, uid=entry.pw_uid, gid=gid, bounded=bounded, no_new_privs=sealed
        ),
    )
    return janitor
