"""The wheel, built and installed offline: what PyPI would show, and that it runs outside the repo.

The build works on a copy of the project's packaging inputs in a temporary directory, so it
leaves no build/ or egg-info in the repo, and sees exactly the files the wheel is made from.
The installed copy runs from an empty directory with the repo off sys.path; its dependencies
come from .venv (a .pth file), so nothing is downloaded.
"""

from __future__ import annotations

import email.message
import email.parser
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from portfwd import __version__
from tests.conftest import need
from tests.integration.peers import free_port
from tests.integration.processes import REPO

pytestmark = pytest.mark.integration

UV = REPO / ".uv" / "bin" / "uv"
DIST_INFO = f"portfwd-{__version__}.dist-info"
#: What setuptools reads to build the wheel; copied into the staging directory when present.
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "setup.py", "setup.cfg", "MANIFEST.in")


@dataclass(frozen=True)
class Built:
    """The staged sources and the wheel built from them."""

    source: Path
    wheel: Path


@dataclass(frozen=True)
class Installed:
    """A fresh venv with only the wheel installed, and an empty directory to run it from."""

    venv: Path
    cwd: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def uv_env(cache: Path) -> dict[str, str]:
    """uv offline, with no Python downloads, no user or system config and a private cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    env.pop("VIRTUAL_ENV", None)
    env.update(UV_OFFLINE="1", UV_PYTHON_DOWNLOADS="never", UV_NO_CONFIG="1", UV_CACHE_DIR=str(cache))
    return env


def user_env() -> dict[str, str]:
    """A user's shell: no repo on sys.path (PYTHONPATH, the current directory), no test warnings."""
    env = dict(os.environ)
    for name in (
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "VIRTUAL_ENV",
        "PYTHONWARNINGS",
        "PYTHONDEVMODE",
    ):
        env.pop(name, None)
    env.update(PYTHONSAFEPATH="1", PYTHONNOUSERSITE="1")
    return env


def run(
    argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env, check=False
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args[:3]} exited {result.returncode}:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """`uv build --wheel --no-build-isolation` with .venv's setuptools, offline, on a staged copy."""
    need(UV.is_file(), f"needs the locked uv at {UV} (scripts/venv.sh installs it)")
    need(importlib.util.find_spec("setuptools") is not None, "needs setuptools in .venv (uv sync)")
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    (source / "src").mkdir(parents=True)
    for name in BUILD_INPUTS:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, source / name)
    shutil.copytree(
        REPO / "src" / "portfwd",
        source / "src" / "portfwd",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.so"),  # built here
    )
    dist = root / "dist"
    argv = [str(UV), "build", "--wheel", "--no-build-isolation", "--python", sys.executable]
    ok(run([*argv, "--out-dir", str(dist), str(source)], source, uv_env(root / "uv-cache"), timeout=120))
    wheels = sorted(dist.glob("*.whl"))
    # A platform wheel: relay/_native.c is compiled into it (setup.py).
    tag = sysconfig.get_config_var("SOABI").split("-")[1]  # cpython-311-x86_64-linux-gnu: 311
    machine = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    assert [w.name for w in wheels] == [f"portfwd-{__version__}-cp{tag}-cp{tag}-{machine}.whl"]
    return Built(source, wheels[0])


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """A new venv holding only the wheel (`uv pip install --offline --no-deps`); deps via a .pth."""
    root = tmp_path_factory.mktemp("installed")
    venv = root / "venv"
    env = uv_env(root / "uv-cache")
    ok(run([str(UV), "venv", "--python", sys.executable, str(venv)], root, env))
    python = venv / "bin" / "python"
    ok(
        run(
            [str(UV), "pip", "install", "--offline", "--no-deps", "--python", str(python), str(built.wheel)],
            root,
            env,
        )
    )
    purelib = ok(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, user_env()
        )
    ).stdout.strip()
    # A path in a .pth is appended to sys.path as is: .venv's own .pth files (the editable
    # install that points at src/) are not read, so portfwd can only come from the wheel.
    (Path(purelib) / "_portfwd_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    cwd = root / "elsewhere"
    cwd.mkdir()
    return Installed(venv, cwd)


def metadata(built: Built) -> email.message.Message:
    with zipfile.ZipFile(built.wheel) as wheel:
        text = wheel.read(f"{DIST_INFO}/METADATA").decode()
    return email.parser.Parser().parsestr(text)


def test_metadata_is_what_pypi_shows(built: Built) -> None:
    meta = metadata(built)
    assert meta["Metadata-Version"] == "2.4"  # the first with License-Expression
    assert meta["Name"] == "portfwd"
    assert meta["Version"] == __version__
    assert meta["Summary"] == "Every kind of port forwarding from one command line and one config file"
    assert meta["Requires-Python"] == ">=3.11"
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload() == (built.source / "README.md").read_text()
    urls = meta.get_all("Project-URL") or []
    assert "Homepage, https://github.com/portfwd/portfwd" in urls
    assert all(url.partition(", ")[2].startswith("https://") for url in urls), urls
    classifiers = meta.get_all("Classifier") or []
    for classifier in (
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3 :: Only",
        "Operating System :: POSIX :: Linux",
        "Environment :: Console",
        "Topic :: System :: Networking",
    ):
        assert classifier in classifiers
    assert "asyncssh<2.25,>=2.24" in (meta.get_all("Requires-Dist") or [])


def test_requirements_admit_the_locked_versions(built: Built) -> None:
    """Every Requires-Dist has a range, and the versions .venv got from uv.lock are inside it."""
    requires = [Requirement(line) for line in metadata(built).get_all("Requires-Dist") or []]
    assert {r.name for r in requires} >= {"click", "rich", "pydantic", "asyncssh", "aiohttp"}
    for requirement in requires:
        assert requirement.specifier, f"{requirement.name} has no version range"
        if requirement.marker is None or requirement.marker.evaluate():
            locked = importlib.metadata.version(requirement.name)
            assert requirement.specifier.contains(locked), f"{requirement} excludes the locked {locked}"
    asyncssh = next(r for r in requires if r.name == "asyncssh")
    assert not asyncssh.specifier.contains("2.25.0")


def test_wheel_carries_the_license_and_every_module(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as wheel:
        names = set(wheel.namelist())
        license_text = wheel.read(f"{DIST_INFO}/licenses/LICENSE").decode()
        entry_points = wheel.read(f"{DIST_INFO}/entry_points.txt").decode()
    assert license_text == (built.source / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in license_text
    assert "[console_scripts]\nportfwd = portfwd.cli:main\n" in entry_points
    # Every module of the package (a subpackage without __init__.py would be dropped silently).
    modules = {p.relative_to(built.source / "src").as_posix() for p in (built.source / "src").rglob("*.py")}
    assert {n for n in names if n.endswith(".py")} == modules
    assert any(n.startswith("portfwd/relay/_native.") and n.endswith(".so") for n in names), names
    assert "portfwd/relay/_native.pyi" in names
    # The dashboard's page: portfwd serves it from the installed package.
    assets = {
        p.relative_to(built.source / "src").as_posix()
        for p in (built.source / "src/portfwd/web/assets").iterdir()
    }
    assert assets == {
        "portfwd/web/assets/index.html",
        "portfwd/web/assets/app.js",
        "portfwd/web/assets/app.css",
    }
    assert assets <= names
    assert not any(n.startswith(("tests/", "build/")) or ".egg-info/" in n for n in names)


def test_installed_version_and_check(installed: Installed) -> None:
    version = run([str(installed.bin / "portfwd"), "--version"], installed.cwd, user_env(), timeout=30)
    assert (version.returncode, version.stdout, version.stderr) == (0, f"portfwd {__version__}\n", "")
    config = installed.cwd / "tiny.toml"
    config.write_text(f'[[forward]]\nlisten = "127.0.0.1:{free_port()}"\nconnect = "127.0.0.1:9"\n')
    check = run(
        [str(installed.bin / "portfwd"), "check", "-c", str(config)], installed.cwd, user_env(), timeout=30
    )
    assert (check.returncode, check.stderr) == (0, "")
    assert check.stdout.endswith("config OK\n")


def test_installed_package_is_imported_from_the_venv(installed: Installed) -> None:
    code = "import portfwd, importlib.metadata as m; print(portfwd.__file__); print(m.version('portfwd'))"
    result = ok(run([str(installed.bin / "python"), "-c", code], installed.cwd, user_env(), timeout=30))
    path, version = result.stdout.splitlines()
    assert Path(path).is_relative_to(installed.venv), path
    assert not Path(path).is_relative_to(REPO / "src"), path
    assert version == __version__


def test_installed_package_has_the_c_engine(installed: Installed) -> None:
    code = "import portfwd.relay._native as n; print(n.__file__); print(n.Engine.__name__)"
    result = ok(run([str(installed.bin / "python"), "-c", code], installed.cwd, user_env(), timeout=30))
    path, name = result.stdout.splitlines()
    assert Path(path).is_relative_to(installed.venv), path
    assert path.endswith(".so"), path
    assert name == "Engine"


def test_installed_shell_completion(installed: Installed) -> None:
    portfwd = str(installed.bin / "portfwd")
    script = run([portfwd], installed.cwd, {**user_env(), "_PORTFWD_COMPLETE": "bash_source"}, timeout=30)
    assert script.returncode == 0, script.stderr
    assert "_portfwd_completion() {" in script.stdout
    assert "complete -o nosort -F _portfwd_completion portfwd" in script.stdout
    env = {**user_env(), "_PORTFWD_COMPLETE": "bash_complete", "COMP_WORDS": "portfwd ch", "COMP_CWORD": "1"}
    words = run([portfwd], installed.cwd, env, timeout=30)
    assert (words.returncode, words.stdout) == (0, "plain,check\n")
