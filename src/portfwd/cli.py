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
from collections.abc import Callable

import click
from rich.console import Console
from rich.table import Table

from portfwd import __version__, config, runtime, spec
from portfwd.errors import ConfigError, PortfwdError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


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


def _setup_logging(verbose: int, quiet: bool, log_format: str) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("portfwd").setLevel(logging.DEBUG if verbose and not quiet else logging.NOTSET)


def _logging_options(command: Callable[..., None]) -> Callable[..., None]:
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


_config_option = click.option(
    "-c",
    "--config",
    "config_file",
    metavar="FILE",
    help="Config file (default: $PORTFWD_CONFIG, ./portfwd.toml, ~/.config/portfwd/, /etc/portfwd/).",
)
_strict_option = click.option("--strict", is_flag=True, help="Exit 1 if any rule cannot start.")


@click.group(context_settings=CONTEXT)
@click.version_option(
    __version__, "--version", message="portfwd %(version)s", help="Print the version and exit."
)
def app() -> None:
    """Every kind of port forwarding from one command line and one config file."""


@app.command()
@_config_option
@_strict_option
@_logging_options
def run(config_file: str | None, strict: bool, verbose: int, quiet: bool, log_format: str) -> None:
    """Run everything the config declares; SIGTERM/SIGINT drains and removes what it created."""
    _setup_logging(verbose, quiet, log_format)
    path = config.find(config_file)
    loaded = config.load(path)
    logging.getLogger("portfwd").info("config %s", path)
    runtime.run(loaded, strict=strict)


@app.command()
@_config_option
def check(config_file: str | None) -> None:
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
@click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
@click.option("--allow", multiple=True, metavar="CIDR", help="Admit only these sources (repeatable).")
@click.option("--deny", multiple=True, metavar="CIDR", help="Refuse these sources (repeatable).")
@_strict_option
@_logging_options
def forward(
    specs: tuple[str, ...],
    allow: tuple[str, ...],
    deny: tuple[str, ...],
    strict: bool,
    verbose: int,
    quiet: bool,
    log_format: str,
) -> None:
    """Quick forwards, no config file: SPEC is [bind:]port:host:hostport[/udp|/tcp+udp]."""
    _setup_logging(verbose, quiet, log_format)
    loaded = spec.rules_from_specs(specs, allow, deny)
    runtime.run(loaded, strict=strict)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and turn every failure into one line and an exit code."""
    try:
        code = app.main(args=argv, prog_name="portfwd", standalone_mode=False)
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
    sys.exit(code if isinstance(code, int) else 0)
