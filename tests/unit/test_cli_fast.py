"""`portfwd map add|ip`: how click reads their command lines, and that they start fast (no rich, pydantic or asyncio)."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portfwd.cli import main
from portfwd.router.base import Granted, MapRequest

REPO = Path(__file__).resolve().parents[2]
GRANTED = Granted("pcp", "tcp", "192.168.1.9", 8080, "203.0.113.7", 8080, 7200)


class _Router:
    """Stands in for the router: records what `map add|ip` asked of it."""

    name = "pcp"
    where = "192.168.1.1:5351"

    def __init__(self) -> None:
        self.asked: list[tuple[str, Any]] = []
        self.logging: tuple[int, bool, str] | None = None
        self.remembered: list[Granted] = []

    def add(self, request: MapRequest) -> None:
        self.asked.append(("add", request))

    def external_address(self) -> None:
        self.asked.append(("ip", None))

    def one_shot(
        self,
        method: str,
        gateway: str | None,
        upnp_url: str | None,
        tries: int | None,
        attempt: Any,
        *,
        timeout: float,
        notice: Any,
    ) -> tuple[_Router, object]:
        attempt(self)
        options = {
            "method": method,
            "gateway": gateway,
            "upnp_url": upnp_url,
            "tries": tries,
            "timeout": timeout,
        }
        self.asked.append(("options", options))
        return self, GRANTED if self.asked[0][0] == "add" else "203.0.113.7"

    def remember(self, used: object, granted: Granted) -> None:
        self.remembered.append(granted)

    def setup_logging(self, verbose: int, quiet: bool, log_format: str) -> None:
        self.logging = (verbose, quiet, log_format)


def _run(argv: list[str]) -> tuple[int, str, str, _Router]:
    """`portfwd ARGV` against a stand-in router: exit code, stdout, stderr, what it was asked."""
    router = _Router()
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch("portfwd.oneshot.one_shot", router.one_shot),
        mock.patch("portfwd.oneshot.remember", router.remember),
        mock.patch("portfwd.cli.maps.setup_logging", router.setup_logging),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        pytest.raises(SystemExit) as info,
    ):
        main(argv)
    return int(info.value.code or 0), out.getvalue(), err.getvalue(), router


DEFAULTS = {"method": "auto", "gateway": None, "upnp_url": None, "tries": None, "timeout": 10.0}


@pytest.mark.parametrize(
    ("argv", "asked", "options", "logging"),
    [
        # Without -v a one-shot command logs warnings and errors only (quiet): no INFO lines.
        (["map", "add", "8080"], ("add", MapRequest("tcp", 8080, 8080, 7200)), {}, (0, True, "text")),
        (
            ["map", "add", "8080/udp", "--external=any", "--lease", "90s", "--method", "pcp", "-v", "-q"],
            ("add", MapRequest("udp", 8080, 0, 90)),
            {"method": "pcp"},
            (1, True, "text"),
        ),
        (
            ["map", "ip", "--tries", "2", "--gateway", "10.0.0.1", "--log-format=json", "--timeout=1m"],
            ("ip", None),
            {"tries": 2, "gateway": "10.0.0.1", "timeout": 60.0},
            (0, True, "json"),
        ),
        (
            ["map", "add", "8080", "--to", "192.168.1.9", "--method", "upnp", "-vq"],
            ("add", MapRequest("tcp", 8080, 8080, 7200, "192.168.1.9")),
            {"method": "upnp"},
            (1, True, "text"),
        ),
        (["map", "add", "--", "8080"], ("add", MapRequest("tcp", 8080, 8080, 7200)), {}, (0, True, "text")),
        (
            ["map", "add", "8080", "--timeout", "500ms", "-v"],
            ("add", MapRequest("tcp", 8080, 8080, 7200)),
            {"timeout": 0.5},
            (1, False, "text"),
        ),
    ],
)
def test_map_commands_ask_the_router_what_the_command_line_says(
    argv: list[str], asked: tuple[str, Any], options: dict[str, Any], logging: tuple[int, bool, str]
) -> None:
    code, out, err, router = _run(argv)
    assert (code, err) == (0, "")
    assert router.asked == [asked, ("options", {**DEFAULTS, **options})]
    assert router.logging == logging
    assert router.remembered == ([GRANTED] if asked[0] == "add" else [])
    assert out == (
        "203.0.113.7:8080/tcp -> 192.168.1.9:8080 via pcp (lease 7200 s)\n"
        if asked[0] == "add"
        else "203.0.113.7 (via pcp at 192.168.1.1:5351)\n"
    )


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["map", "add"], "PORT[/PROTO]"),
        (["map", "add", "8080", "9090"], "9090"),
        (["map", "add", "80x80"], "80x80"),
        (["map", "add", "8080/sctp"], "8080/sctp"),
        (["map", "add", "8080", "--external", "70000"], "--external"),
        (["map", "add", "8080", "--lease", "soon"], "--lease"),
        (["map", "add", "8080", "--method", "carrier-pigeon"], "carrier-pigeon"),
        (["map", "add", "8080", "--tries", "0"], "--tries"),
        (["map", "add", "8080", "--tries"], "--tries"),
        (["map", "add", "8080", "--timeout", "soon"], "--timeout"),
        (["map", "ip", "--timeout", "0s"], "--timeout"),
        (["map", "add", "8080", "--log-format", "xml"], "xml"),
        (["map", "ip", "--external", "80"], "--external"),  # add's options mean nothing to ip
        (["map", "ip", "8080"], "8080"),
    ],
)
def test_a_wrong_map_command_line_is_one_line_and_asks_nothing(argv: list[str], word: str) -> None:
    code, out, err, router = _run(argv)
    assert (code, out, router.asked) == (2, "", [])
    assert err.count("\n") == 1
    assert err.startswith("portfwd: ")
    assert word in err
    assert err.endswith(
        " --help)\n"
    )  # `portfwd map add --help`, or `portfwd --help` when click has no context


@given(
    st.lists(
        st.sampled_from(
            ["map", "add", "ip", "8080", "--lease", "2h", "-v", "--tries", "x", "=", "--method=pcp"]
        )
        | st.text(),
        max_size=8,
    ).map(lambda tail: ["map", "add", *tail])
)
def test_any_map_add_command_line_ends_in_an_exit_code(argv: list[str]) -> None:
    code, out, err, router = _run(argv)
    if code == 0:
        assert out.startswith("Usage:") if not router.asked else router.asked[0][0] == "add"
    else:
        assert (code, router.asked) == (2, [])
        assert err.startswith("portfwd: ")


def test_map_add_imports_neither_rich_pydantic_nor_asyncio(tmp_path: Path) -> None:
    """`-X importtime` lists every module the process loaded; nothing listens on loopback's 5351.

    click is loaded (one parser for every command); what `map add` must never pay for is the
    rest of the CLI: rich, pydantic and the config, asyncio and the runtime.
    """
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
    assert {"click", "portfwd.oneshot", "portfwd.router.pcp", "portfwd.router.blocking"} <= loaded
    heavy = {"rich", "asyncio", "pydantic", "portfwd.config", "portfwd.cli.commands", "portfwd.runtime"}
    assert not loaded & heavy
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert (result.returncode, errors) == (1, ["portfwd: PCP: 127.0.0.1:5351 refused (no PCP service there)"])


def test_status_of_a_config_file_loads_no_config_models(tmp_path: Path) -> None:
    """`status -c FILE` needs only `[control] socket` from the file (portfwd.configfile): the
    pydantic models, most of a status call's start-up, are not imported."""
    config = tmp_path / "portfwd.toml"
    config.write_text(f'[control]\nsocket = "{tmp_path / "none.sock"}"\n')
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "portfwd", "status", "--json", "-c", str(config)],
        capture_output=True, text=True, timeout=30, cwd=REPO, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    loaded = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "portfwd.configfile" in loaded
    assert not loaded & {"pydantic", "portfwd.config"}
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode == 1, errors
    assert any("none.sock" in line for line in errors), errors
