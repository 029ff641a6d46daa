"""The SSH fast path's fence: it runs only on the asyncssh it was checked against, and says when that moved."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from portfwd.ssh import lean

SRC = Path(__file__).resolve().parents[2] / "src" / "portfwd"


def test_installed_asyncssh_is_the_one_the_fast_path_was_checked_against() -> None:
    installed = lean.installed_asyncssh()
    assert installed in lean.VERIFIED, (
        f"asyncssh {installed} is installed, but the SSH fast path (portfwd/ssh/lean) was checked "
        f"against {', '.join(lean.VERIFIED)}: re-read {', '.join(lean.MIRRORED)} against lean/packets.py, "
        "lean/receive.py, lean/aead.py and lean/kex.py, then update lean.VERIFIED and lean.MIRRORED"
    )


def test_the_asyncssh_code_the_fast_path_mirrors_has_not_moved() -> None:
    moved = lean.changed()
    assert not moved, (
        f"asyncssh {lean.installed_asyncssh()} changed what the SSH fast path mirrors: re-read "
        f"{', '.join(moved)} against portfwd/ssh/lean, then update their digests in lean.MIRRORED"
    )


def test_on_by_default_off_by_switch() -> None:
    assert lean.fast_path(True) == lean.FastPath(True, "SSH fast path on")
    off = lean.fast_path(False)
    assert not off.on
    assert off.reason == "SSH fast path off (ssh_fast_path = false): tunnels use asyncssh's own path"


def test_another_asyncssh_turns_it_off_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lean, "installed_asyncssh", lambda: "2.99.0")
    lean.fast_path.cache_clear()
    try:
        assert lean.fast_path(True) == lean.FastPath(
            False,
            "SSH fast path off: asyncssh 2.99.0 is not the release it was checked against "
            f"({', '.join(lean.VERIFIED)}); tunnels use asyncssh's own, slower path",
        )

        class Connection:
            send_packet = "asyncssh's own"

        conn = Connection()
        lean.tune(conn, True)
        assert conn.send_packet == "asyncssh's own", "nothing is installed on an unverified asyncssh"
    finally:
        lean.fast_path.cache_clear()


def test_only_the_fence_imports_asyncssh_internals() -> None:
    internal = re.compile(r"^\s*(from|import) asyncssh\.(connection|packet|logging|constants|misc)\b", re.M)
    outside = [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if "lean" not in path.parts and internal.search(path.read_text())
    ]
    assert outside == []
