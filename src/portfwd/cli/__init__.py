"""The command line, the only part of portfwd that prints; `main` is the `portfwd` executable.

One click parser for every command. Start-up time is kept in one place, `LazyGroup`: a command's
module is imported when that command runs (or when `--help` lists it), not at start-up, so each
command pays for what it uses. `portfwd map add 8080` should be about as quick as `natpmpc` or
`upnpc` (the router answers in a millisecond; the rest is start-up): it loads click, `maps.py`
and the router drivers (`oneshot.py`), never pydantic, rich or asyncio. The config commands
(`commands.py`) import those inside the command that needs them. `console.py` holds what every
command prints through: log set-up and the error line.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from portfwd import __version__
from portfwd.cli.console import quiet_dependencies, report

#: Every command and where it is defined, `module:name`; imported only when it is used.
COMMANDS = {
    "check": "portfwd.cli.commands:check",
    "forward": "portfwd.cli.commands:forward",
    "gateway": "portfwd.cli.gateway:gateway",
    "map": "portfwd.cli.maps:map_group",
    "reload": "portfwd.cli.commands:reload",
    "run": "portfwd.cli.commands:run",
    "server": "portfwd.cli.commands:server",
    "ssh": "portfwd.cli.ssh:ssh",
    "status": "portfwd.cli.commands:status",
}

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class LazyGroup(click.Group):
    """A click group that imports a command's module when the command is looked up."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.lazy)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = self.lazy.get(cmd_name)
        if where is None:
            return None
        module, _, name = where.partition(":")
        command = getattr(importlib.import_module(module), name)
        assert isinstance(command, click.Command), where
        return command


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings=CONTEXT)
@click.version_option(
    __version__, "--version", message="portfwd %(version)s", help="Print the version and exit."
)
def app() -> None:
    """Every kind of port forwarding from one command line and one config file."""


def logging_options(command: Callable[..., None]) -> Callable[..., None]:
    """-v/-q/--log-format, shared by the commands that run something."""
    command = click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="Log lines for people (text) or machines (json).",
    )(command)
    command = click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")(command)
    return click.option(
        "-v", "--verbose", count=True, help="-v: portfwd's debug lines; -vv: every library's too."
    )(command)


def main(argv: list[str] | None = None) -> NoReturn:
    """Console script: run the command and turn every failure into one line and an exit code.

    Exit 2 for usage and config errors, 1 for runtime failures, 130 for Ctrl-C; no traceback
    unless PORTFWD_DEBUG=1. Always raises SystemExit, except that the executable (`argv` None)
    ends a `map` command without the interpreter's teardown: see `_leave`.
    """
    quiet_dependencies()  # before any command imports a dependency that warns at import
    try:
        code = app.main(args=argv, prog_name="portfwd", standalone_mode=False)
        code = code if isinstance(code, int) else 0
    except click.exceptions.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else "", file=sys.stderr)
        code = 2
    except click.UsageError as exc:
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx else " (see portfwd --help)"
        print(f"portfwd: {exc.format_message()}{hint}", file=sys.stderr)
        code = 2
    except click.exceptions.Abort:
        code = 130
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the last boundary: one line, even for a bug
        code = report(exc)
    if argv is None and sys.argv[1:2] == ["map"]:
        _leave(code)
    sys.exit(code)


def _leave(code: int) -> NoReturn:
    """Exit without the interpreter's teardown, which with click loaded takes a good part of a
    `map add`'s time. Only for `map`: it leaves no thread, child, file or event loop open.
    """
    writer = sys.modules.get("portfwd.cli.logwriter")
    if writer is not None:
        writer.flush()  # the log lines its thread has yet to write
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe: let the normal exit report it
        sys.exit(code)
    os._exit(code)
