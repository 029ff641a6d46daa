"""cli/__init__.py: which command lines take the fast path, and that it stays fast (no click, no asyncio)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portfwd.cli import _read
from portfwd.router.base import MapRequest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["map", "add", "8080"], (MapRequest("tcp", 8080, 8080, 7200), {}, 0, False)),
        (
            ["map", "add", "8080/udp", "--external=any", "--lease", "90s", "--method", "pcp", "-v", "-q"],
            (
                MapRequest("udp", 8080, 0, 90),
                {"--external": "any", "--lease": "90s", "--method": "pcp"},
                1,
                True,
            ),
        ),
        (
            ["map", "ip", "--tries", "2", "--gateway", "10.0.0.1"],
            (None, {"--tries": "2", "--gateway": "10.0.0.1"}, 0, False),
        ),
        (
            ["map", "add", "8080", "--to", "192.168.1.9", "--method", "upnp"],
            (
                MapRequest("tcp", 8080, 8080, 7200, "192.168.1.9"),
                {"--to": "192.168.1.9", "--method": "upnp"},
                0,
                False,
            ),
        ),
    ],
)
def test_plain_forms_take_the_fast_path(argv: list[str], expected: tuple[object, ...]) -> None:
    assert _read(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["map"],
        ["map", "list"],
        ["map", "remove", "8080"],
        ["run"],
        ["map", "add"],  # missing PORT: the full CLI says so
        ["map", "add", "8080", "9090"],
        ["map", "add", "--help"],
        ["map", "add", "8080", "-h"],
        ["map", "add", "80x80"],
        ["map", "add", "8080/sctp"],
        ["map", "add", "8080", "--external", "70000"],
        ["map", "add", "8080", "--lease", "soon"],
        ["map", "add", "8080", "--method", "carrier-pigeon"],
        ["map", "add", "8080", "--tries", "0"],
        ["map", "add", "8080", "--tries"],
        ["map", "add", "8080", "--lease", "1h", "--lease", "2h"],
        ["map", "add", "8080", "-vq"],
        ["map", "add", "8080", "--log-format", "xml"],
        ["map", "ip", "--external", "80"],  # add's options mean nothing to ip
        ["map", "ip", "8080"],
        ["map", "add", "--", "8080"],
    ],
)
def test_everything_else_goes_to_the_full_cli(argv: list[str]) -> None:
    assert _read(argv) is None


@given(
    st.lists(
        st.sampled_from(
            ["map", "add", "ip", "8080", "--lease", "2h", "-v", "--tries", "x", "=", "--method=pcp"]
        )
        | st.text(),
        max_size=8,
    ).map(lambda tail: ["map", "add", *tail])
)
def test_reading_never_raises(argv: list[str]) -> None:
    parsed = _read(argv)
    assert parsed is None or parsed.request is not None


def test_fast_path_imports_neither_click_nor_asyncio(tmp_path: Path) -> None:
    """`-X importtime` lists every module the process loaded; nothing listens on loopback's 5351."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "portfwd", "map", "add", "8080", "--gateway", "127.0.0.1",
         "--method", "pcp", "--tries", "1"],
        capture_output=True, text=True, timeout=30, cwd=REPO, env={"PORTFWD_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    loaded = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert {"portfwd.router.pcp", "portfwd.router.blocking"} <= loaded
    assert not loaded & {"click", "rich", "asyncio", "pydantic", "portfwd.cli.commands"}
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert (result.returncode, errors) == (1, ["portfwd: PCP: 127.0.0.1:5351 refused (no PCP service there)"])
