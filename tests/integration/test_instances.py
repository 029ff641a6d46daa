"""One instance, one identity: instances run side by side and `status`/`reload` reach the one meant."""

from __future__ import annotations

import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from portfwd import control
from tests.integration.peers import free_port
from tests.integration.processes import READY, portfwd_argv, run_portfwd, started

pytestmark = pytest.mark.integration


def write_rule(path: Path, name: str) -> Path:
    path.write_text(
        f'[[forward]]\nname = "{name}"\nlisten = "127.0.0.1:{free_port()}"\nconnect = "127.0.0.1:{free_port()}"\n'
    )
    return path


def snapshot(*args: str) -> dict[str, object]:
    result = run_portfwd("status", "--json", *args)
    assert result.returncode == 0, result.stderr
    picture: dict[str, object] = json.loads(result.stdout)
    return picture


def test_two_configs_and_a_quick_forward_side_by_side(tmp_path: Path) -> None:
    one, two = write_rule(tmp_path / "a.toml", "alpha"), write_rule(tmp_path / "b.toml", "beta")
    quick = f"127.0.0.1:{free_port()}:127.0.0.1:{free_port()}"
    with (
        started(portfwd_argv("run", "-c", str(one)), ready=READY) as first,
        started(portfwd_argv("run", "-c", str(two)), ready=READY) as second,
        started(portfwd_argv("forward", quick), ready=READY) as third,
    ):
        alpha, beta = snapshot("-c", str(one)), snapshot("-c", str(two))
        assert (alpha["config"], alpha["kind"]) == (str(one.resolve()), "run")
        assert [rule["name"] for rule in alpha["rules"]] == ["alpha"]  # type: ignore[attr-defined]
        assert (beta["config"], beta["pid"]) == (str(two.resolve()), second.pid)
        assert str(alpha["instance"]).startswith("a-")
        assert str(beta["instance"]).startswith("b-")

        listing = snapshot()["instances"]
        assert sorted((item["kind"], item["pid"]) for item in listing) == sorted(  # type: ignore[attr-defined]
            [("run", first.pid), ("run", second.pid), ("forward", third.pid)]
        )
        table = run_portfwd("status")
        assert table.returncode == 0, table.stderr
        assert "3 running instance(s)" in table.stdout
        for name in (alpha["instance"], beta["instance"], f"forward-{third.pid}"):
            assert str(name) in table.stdout
        by_name = snapshot("--name", f"forward-{third.pid}")
        assert by_name["pid"] == third.pid
        assert by_name["config"] is None

        broken = tmp_path / "broken.toml"
        broken.write_text("[[forward]]\nlisten = 70000\n")
        refused = run_portfwd("reload", "-c", str(broken))
        assert refused.returncode == 2
        assert refused.stdout == ""
        assert refused.stderr.splitlines() == [
            "portfwd: reload refused, the old config keeps running: forward[0].listen: 70000 is not an address; "
            'write a string such as "127.0.0.1:8080"',
            "portfwd: reload refused, the old config keeps running: forward[0].connect: required key is missing; add it",
        ]
        two.write_text("[[forward]\n")  # the running instance's own file, now broken
        refused = run_portfwd("reload", "-c", str(two))
        assert refused.returncode == 2
        assert refused.stderr.startswith(
            f"portfwd: reload refused, the old config keeps running: {two}: invalid TOML: "
        )

        write_rule(one, "alpha2")
        applied = run_portfwd("reload", "-c", str(one))
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout == "reloaded: 0 kept, removed ['alpha'], added ['alpha2']\n"
        broken_status = run_portfwd("status", "-c", str(two))
        assert broken_status.returncode == 2, "a file that does not parse: nothing is asked"
        assert broken_status.stderr.startswith(f"portfwd: {two}: invalid TOML: ")
        beta_now = snapshot("--name", str(beta["instance"]))
        assert [rule["name"] for rule in beta_now["rules"]] == ["beta"]  # type: ignore[attr-defined]
    for proc, reloads in ((first, 1), (second, 0), (third, 0)):
        lines = proc.output().splitlines()
        assert [line for line in lines if " WARNING " in line or "Warning" in line] == []
        assert sum(" reloaded " in line for line in lines) == reloads


def test_status_and_reload_say_when_nothing_runs_the_file(tmp_path: Path) -> None:
    config = write_rule(tmp_path / "idle.toml", "idle")
    result = run_portfwd("status", "-c", str(config))
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"portfwd: no running portfwd runs {config.resolve()}: nothing answers on "
    )
    assert result.stderr.endswith(f"; start it with portfwd run -c {config.resolve()}\n")
    assert run_portfwd("status").stderr == (
        f"portfwd: no running portfwd: no instance answers in {os.environ['PORTFWD_RUNTIME_DIR']}; "
        "start one with portfwd run, or pass -c FILE, --name NAME or --control PATH\n"
    )
    missing = run_portfwd("reload", "-c", str(tmp_path / "missing.toml"))
    assert (missing.returncode, missing.stderr) == (
        2,
        f"portfwd: reload refused, the old config keeps running: {tmp_path / 'missing.toml'}: "
        "no such config file; pass -c FILE or create portfwd.toml\n",
    )


def test_a_named_instance_is_found_by_its_file_and_a_second_of_the_name_is_refused(tmp_path: Path) -> None:
    config = write_rule(tmp_path / "named.toml", "named")
    with started(portfwd_argv("run", "-c", str(config), "--name", "edge"), ready=READY) as running:
        assert snapshot("-c", str(config))["pid"] == running.pid
        assert snapshot("--name", "edge")["instance"] == "edge"
        clash = run_portfwd("forward", "--name", "edge", f"127.0.0.1:{free_port()}:127.0.0.1:9")
        assert clash.returncode == 1
        assert clash.stderr.endswith(
            "is in use: another portfwd of the same name is running; "
            "stop it, or give this instance another --name (portfwd status lists them)\n"
        )
        reloaded = run_portfwd("reload", "--name", "edge")
        assert (reloaded.returncode, reloaded.stdout) == (0, "reloaded: 1 kept, removed none, added none\n")


def test_the_control_socket_refuses_nested_json_and_serves_many_at_once(tmp_path: Path) -> None:
    config = write_rule(tmp_path / "busy.toml", "busy")
    with started(portfwd_argv("run", "-c", str(config)), ready=READY) as running:
        path = Path(str(snapshot("-c", str(config))["control"]))
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(path))
            client.sendall(b"[" * 3000 + b"\n")
            answer = json.loads(client.makefile("rb").readline())
        assert answer == {"ok": False, "errors": ["bad request: JSON nested too deeply"]}

        def ask() -> bool:
            return bool(control.request(path, "status", timeout=30)["ok"])

        with ThreadPoolExecutor(max_workers=64) as pool:
            results = list(pool.map(lambda _: ask(), range(256)))
        assert results == [True] * 256
        output = running.output()
    assert "Traceback" not in output
    assert " ERROR " not in output
