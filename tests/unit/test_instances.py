"""Instance identity: names and control sockets derived from the config file, --name and --control."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from portfwd import instances
from portfwd.errors import ConfigError


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "run"
    monkeypatch.setenv("PORTFWD_RUNTIME_DIR", str(where))
    return where


def test_the_tests_never_use_the_machines_runtime_dir() -> None:
    assert instances.runtime_dir() == Path(os.environ["PORTFWD_RUNTIME_DIR"])
    assert not str(instances.runtime_dir()).startswith(("/run/portfwd", "/run/user"))


def test_a_config_file_names_its_instance_by_stem_and_resolved_path(runtime: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "portfwd.toml", tmp_path / "b" / "portfwd.toml"
    name = instances.name_for_config(first)
    assert name.startswith("portfwd-")
    assert len(name) == len("portfwd-") + 8
    assert instances.name_for_config(first) == name, "the same file always gives the same name"
    assert instances.name_for_config(second) != name, "two files never share a socket"
    relative = Path(os.path.relpath(first))
    assert instances.name_for_config(relative) == name, "relative and absolute spellings agree"
    identity = instances.identify("run", config=first)
    assert identity == instances.Identity(name, runtime / f"{name}.sock", "run", first.resolve())


def test_odd_file_names_still_give_a_socket_name(tmp_path: Path) -> None:
    name = instances.name_for_config(tmp_path / ("..é x" * 30 + ".toml"))
    assert instances.check_name(name) == name
    assert len(name) <= 41


def test_precedence_control_then_name_then_configured_then_file(runtime: Path, tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    explicit = tmp_path / "ctl.sock"
    assert instances.identify("run", config=config, name="x", control=str(explicit)).socket == explicit
    assert instances.identify("run", config=config, name="x").socket == runtime / "x.sock"
    configured = instances.identify("server", config=config, configured=str(explicit))
    assert configured.socket == explicit
    assert configured.name.startswith("edge-")


def test_quick_instances_are_named_by_kind_and_pid(runtime: Path) -> None:
    assert instances.identify("forward", pid=4242) == instances.Identity(
        "forward-4242", runtime / "forward-4242.sock", "forward"
    )
    assert instances.identify("ssh").name == f"ssh-{os.getpid()}"


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "-x", "x" * 65, "sp ace", "new\nline"])
def test_a_name_that_cannot_be_a_socket_file_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        instances.identify("forward", name=bad)
    assert str(caught.value).startswith(f"--name: {bad!r} cannot name an instance; use 1-64 letters")


def test_listed_shows_only_sockets(runtime: Path) -> None:
    assert instances.listed() == []
    runtime.mkdir()
    (runtime / "not-a-socket.sock").write_text("")
    (runtime / "other.txt").write_text("")
    with socket.socket(socket.AF_UNIX) as one, socket.socket(socket.AF_UNIX) as two:
        one.bind(str(runtime / "b.sock"))
        two.bind(str(runtime / "a.sock"))
        assert instances.listed() == [runtime / "a.sock", runtime / "b.sock"]
