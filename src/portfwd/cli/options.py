"""Options several commands share (`-c`, `--strict`, `--name`, `--control`, `--no-ssh-fast-path`)."""

from __future__ import annotations

import click

config_option = click.option(
    "-c",
    "--config",
    "config_file",
    metavar="FILE",
    help="Config file (default: $PORTFWD_CONFIG, ./portfwd.toml, ~/.config/portfwd/, /etc/portfwd/).",
)
strict_option = click.option("--strict", is_flag=True, help="Exit 1 if any rule cannot start.")
name_option = click.option(
    "--name", metavar="NAME", help="Name this instance (its control socket is NAME.sock; see status)."
)
control_option = click.option(
    "--control", "control_socket", metavar="PATH", help="Serve the control socket at PATH instead."
)
fast_path_option = click.option(
    "--no-ssh-fast-path",
    "no_fast_path",
    is_flag=True,
    help="Use asyncssh's own packet path (the same as ssh_fast_path = false).",
)
