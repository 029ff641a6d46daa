"""The open-files limit: raised to the hard limit at start, and a warning when it is near.

Near the limit, accept(2) fails with EMFILE, and the event loop's acceptors (asyncssh's among
them) drop such clients without a word. One warning says so instead.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource

log = logging.getLogger(__name__)

#: Warn when this share of the soft limit is in use.
DESCRIPTOR_WARN = 0.9


def descriptors_warning() -> None:
    """Warn when open files are above DESCRIPTOR_WARN of the soft limit (Linux: /proc/self/fd)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            return
        used = soft  # not even one more to look with: the limit is reached
    if used >= soft * DESCRIPTOR_WARN:
        log.warning(
            "open files: %d of the limit of %d in use; new connections fail (EMFILE) when it is reached; "
            "raise the limit (LimitNOFILE=, ulimit -n)",
            used,
            soft,
        )


def raise_fd_limit() -> None:
    """Raise the soft open-files limit to the hard one: each relayed TCP client needs 2 fds (+4 mid-burst)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
