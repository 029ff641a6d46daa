"""Which running instance `portfwd status` or `portfwd reload` means, and asking it.

`--control PATH` and `--name NAME` say it outright. `-c FILE` (or the usual config lookup for
`reload`) means the instance running FILE: its socket is derived from FILE as the instance
derived it (instances.py), and when nothing answers there, the instances in the runtime
directory are asked which of them runs FILE (it may have been started with `--name`). An
instance that answers for another file is never taken for FILE's. With none of these,
`status` lists every instance it can see. A status answer is read as this portfwd's types
(status.py) before anyone sees it, so an instance of another version fails with one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from portfwd import control, instances
from portfwd.errors import RuntimeFailure
from portfwd.status import Snapshot


class Target(NamedTuple):
    """A control socket to ask, and the config the instance there must run (None: any)."""

    socket: Path
    config: Path | None


def target(config_file: str | None, name: str | None, socket: str | None, *, validate: bool) -> Target | None:
    """The instance meant, or None for "every instance" (only when nothing names one).

    With `validate` (reload), the config must load whole; otherwise (status) it must be TOML.
    Raises ConfigError (exit 2) for a missing or broken config file, before anything is sent.
    """
    if socket:
        return Target(Path(socket), None)
    if name:
        return Target(instances.socket_for(instances.check_name(name)), None)
    from portfwd import configfile  # here, not at the top: see cli/__init__.py on start-up time

    if not validate and not config_file and not os.environ.get("PORTFWD_CONFIG"):
        return None
    path = configfile.find(config_file)
    if validate:
        from portfwd import config  # the models: only a reload validates the whole file

        configured = config.load(path).control.socket
    else:
        configured = configfile.control_socket(path)
    resolved = path.resolve()
    if configured:
        return Target(Path(configured), resolved)
    return Target(instances.socket_for(instances.name_for_config(resolved)), resolved)


def ask(where: Target, command: str) -> dict[str, Any]:
    """Send `command` to the instance meant and return its answer.

    A status answer's snapshot comes back checked (`checked`). Raises RuntimeFailure, and
    StatusError for a snapshot this portfwd cannot read.
    """
    try:
        answer = control.request(where.socket, command, config=where.config)
    except RuntimeFailure:
        if where.config is None:
            raise
        found = _running(where.config)
        if found is None:
            raise RuntimeFailure(
                f"no running portfwd runs {where.config}: nothing answers on {where.socket}",
                hint=f"start it with portfwd run -c {where.config}",
            ) from None
        answer = control.request(found, command, config=where.config)
    if command == "status" and answer.get("ok"):
        answer["status"] = checked(answer.get("status"))
    return answer


def checked(data: object) -> dict[str, Any]:
    """An instance's JSON snapshot read as `status.Snapshot` and written back: its schema version
    checked, every value of the right type, keys this portfwd does not know left out.

    Raises StatusError (one line) otherwise.
    """
    return Snapshot.from_json(data).to_json()


def _running(config: Path) -> Path | None:
    """The socket of a listed instance that runs `config` (started with --name, say), or None."""
    for socket in instances.listed():
        try:
            answer = control.request(socket, "status", timeout=2.0)
        except RuntimeFailure:
            continue
        if answer.get("ok") and answer.get("status", {}).get("config") == str(config):
            return socket
    return None


def every() -> list[dict[str, Any]]:
    """Snapshots of every instance listed in the runtime directory that answers, checked.

    Raises StatusError for an instance whose snapshot this portfwd cannot read.
    """
    snapshots = []
    for socket in instances.listed():
        try:
            answer = control.request(socket, "status", timeout=2.0)
        except RuntimeFailure:
            continue  # stale: an instance that died without removing its socket
        if answer.get("ok") and isinstance(answer.get("status"), dict):
            snapshots.append(checked(answer["status"]))
    return snapshots


def none_running() -> RuntimeFailure:
    """The error for `status` when no instance answers in the runtime directory."""
    return RuntimeFailure(
        f"no running portfwd: no instance answers in {instances.runtime_dir()}",
        hint="start one with portfwd run, or pass -c FILE, --name NAME or --control PATH",
    )
