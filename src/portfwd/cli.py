"""The command line: parses arguments, sets up logging, prints results. The only module that prints.

Every error reaches the user as one line, `portfwd: <what>; <fix>`, with exit code 2 for usage
and config errors and 1 for runtime failures. No traceback is shown unless PORTFWD_DEBUG=1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from portfwd import __version__, config, runtime, spec
from portfwd.errors import ConfigError, PortfwdError

app = typer.Typer(
    name="portfwd",
    help="Every kind of port forwarding from one command line and one config file.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ConfigOption = Annotated[
    str | None,
    typer.Option("-c", "--config", help="Config file (default: $PORTFWD_CONFIG, ./portfwd.toml, ...)."),
]
VerboseOption = Annotated[
    int, typer.Option("-v", "--verbose", count=True, help="More log detail (-vv for debug).")
]
QuietOption = Annotated[bool, typer.Option("-q", "--quiet", help="Only warnings and errors.")]
StrictOption = Annotated[bool, typer.Option("--strict", help="Exit 1 if any rule cannot start.")]
LogFormatOption = Annotated[str, typer.Option("--log-format", help="text or json.")]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "ts": record.created,
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": record.getMessage(),
            }
        )


def _setup_logging(verbose: int, quiet: bool, log_format: str = "text") -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    elif log_format == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    else:
        raise click.BadParameter(
            f"{log_format!r} is not a log format; use text or json", param_hint="--log-format"
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _version(value: bool) -> None:
    if value:
        print(f"portfwd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """portfwd: userspace forwards, SSH tunnels, gateway NAT and router mappings."""


@app.command()
def run(
    config_file: ConfigOption = None,
    strict: StrictOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
    log_format: LogFormatOption = "text",
) -> None:
    """Run everything the config declares; SIGTERM/SIGINT drains and removes what it created."""
    _setup_logging(verbose, quiet, log_format)
    path = config.find(config_file)
    loaded = config.load(path)
    logging.getLogger("portfwd").info("config %s", path)
    runtime.run(loaded, strict=strict)


@app.command()
def check(config_file: ConfigOption = None) -> None:
    """Validate the config and print what would run; exit 0, or 2 with one line per error."""
    path = config.find(config_file)
    loaded = config.load(path)
    console = Console()
    table = Table(title=f"{path}: {len(loaded.forward)} forward rule(s)", title_justify="left")
    for column in ("rule", "listen", "connect", "protocol", "access", "relay"):
        table.add_column(column)
    for row in runtime.describe(loaded):
        table.add_row(*row)
    console.print(table)
    if loaded.metrics is not None:
        console.print(f"metrics: http://{loaded.metrics.listen}/metrics")
    if loaded.user is not None:
        console.print(f"after binding, runs as user {loaded.user}")
    console.print("config OK")


@app.command()
def forward(
    specs: Annotated[
        list[str],
        typer.Argument(help="[bind:]port:host:hostport[/udp|/tcp+udp], ...", show_default=False),
    ],
    allow: Annotated[
        list[str] | None, typer.Option("--allow", help="Admit only these CIDRs (repeatable).")
    ] = None,
    deny: Annotated[list[str] | None, typer.Option("--deny", help="Refuse these CIDRs (repeatable).")] = None,
    strict: StrictOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
    log_format: LogFormatOption = "text",
) -> None:
    """Quick userspace forwards with no config file, e.g. `portfwd forward 8080:10.0.0.5:80`."""
    _setup_logging(verbose, quiet, log_format)
    loaded = spec.rules_from_specs(specs, allow or [], deny or [])
    runtime.run(loaded, strict=strict)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and turn every failure into one line and an exit code."""
    try:
        app(args=argv, prog_name="portfwd", standalone_mode=False)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"portfwd: {line}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except PortfwdError as exc:
        print(f"portfwd: {exc.line()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else "", file=sys.stderr)
        sys.exit(2)
    except click.UsageError as exc:
        hint = (
            f" (see portfwd {exc.ctx.info_name} --help)"
            if exc.ctx and exc.ctx.parent
            else " (see portfwd --help)"
        )
        print(f"portfwd: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last boundary: a bug must still be one line
        if os.environ.get("PORTFWD_DEBUG"):
            traceback.print_exc()
        print(
            f"portfwd: internal error: {type(exc).__name__}: {exc} (set PORTFWD_DEBUG=1 for details)",
            file=sys.stderr,
        )
        sys.exit(1)
