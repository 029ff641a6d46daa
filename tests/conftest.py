"""Shared test policy: skip with a reason when a peer or root is missing, fail instead under CI."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import pytest
import uvloop

IN_CI = os.environ.get("CI", "").lower() == "true"
_HERMETIC: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """Keep the suite off the machine's default paths, whatever else runs on it.

    Every portfwd the tests start (in this process or as a child) puts its control socket in a
    private runtime directory, keeps its state in a private state directory and sees a private
    HOME: no test reads or writes /run/portfwd, /var/lib/portfwd, $XDG_RUNTIME_DIR/portfwd or the
    user's ~/.ssh, so the suite passes beside another portfwd.
    """
    root = tempfile.mkdtemp(prefix="portfwd-tests-")
    _HERMETIC.append(root)
    os.environ["PORTFWD_RUNTIME_DIR"] = os.path.join(root, "run")
    os.environ["PORTFWD_STATE_DIR"] = os.path.join(root, "state")
    # relay = "auto" stays in userspace: only the kernel relay's own tests load nftables here.
    os.environ["PORTFWD_AUTO_KERNEL"] = "0"
    os.environ["HOME"] = os.path.join(root, "home")
    os.makedirs(os.environ["HOME"], mode=0o700)
    os.environ.pop("PORTFWD_CONFIG", None)


def pytest_unconfigure(config: pytest.Config) -> None:
    for root in _HERMETIC:
        shutil.rmtree(root, ignore_errors=True)


def need(condition: bool, reason: str) -> None:
    """Skip the test with `reason` unless `condition`; under CI=true a missing need is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)


def need_binary(name: str, package: str) -> str:
    """Path of a peer program, or skip/fail with the apt package that provides it."""
    path = shutil.which(name)
    need(path is not None, f"needs {name} (apt-get install {package})")
    assert path is not None
    return path


def need_root() -> None:
    """Skip/fail unless running as root."""
    need(os.geteuid() == 0, "needs root (privilege drop, capabilities, network namespaces)")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Run async tests on uvloop, the loop portfwd itself runs on."""
    return {"uvloop": uvloop.new_event_loop}
