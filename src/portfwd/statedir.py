"""Where portfwd keeps small state that outlives a process (router mappings, PCP nonce key,
the kernel settings the gateway changed): $PORTFWD_STATE_DIR, /var/lib/portfwd as root, else XDG.

Plain `os.path`: pathlib would add a millisecond to every `portfwd map add`.
"""

from __future__ import annotations

import os


def state_dir() -> str:
    """The state directory's path (not created here)."""
    if env := os.environ.get("PORTFWD_STATE_DIR"):
        return env
    if os.geteuid() == 0:
        return "/var/lib/portfwd"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "portfwd")
