"""The command line, the only part of portfwd that prints; `main` is the `portfwd` executable.

It runs plain `map add` and `map ip` straight away and hands everything else to the full CLI.

`portfwd map add 8080` should be as quick as `natpmpc` or `upnpc`: the router answers in a
millisecond, so the time is start-up, and click, rich, pydantic and asyncio together take about
90 ms to import. `main` reads argv by hand for the two commands' well-formed options and
runs them through `oneshot.py` (about 35 ms in all). Anything else — help, another command, an
option it does not know, a value it cannot read — goes to the full CLI (`commands.py`)
untouched, which parses it again and gives its usual answer or error, so there is only one
place for messages. `console.py` holds what both print through: log set-up, the error line.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from portfwd.router.base import MapRequest

#: Options that take a value, with what the fast path accepts for it (None: any text).
_VALUES: dict[str, tuple[str, ...] | None] = {
    "--external": None,
    "--lease": None,
    "--to": None,
    "--method": ("auto", "pcp", "natpmp", "upnp"),
    "--tries": tuple(str(n) for n in range(1, 21)),
    "--gateway": None,
    "--upnp-url": None,
    "--log-format": ("text", "json"),
}
_ONLY_ADD = ("--external", "--lease", "--to")


def main(argv: list[str] | None = None) -> None:
    """Console script: the fast path when it applies, else `commands.main`."""
    from portfwd.cli.console import quiet_dependencies

    quiet_dependencies()
    argv = sys.argv[1:] if argv is None else argv
    plain = _read(argv)
    if plain is None:
        from portfwd.cli.commands import main as full_cli

        full_cli(argv)
        return
    from portfwd.cli.console import report

    try:
        code = _run(plain)
    except BaseException as exc:  # noqa: BLE001 - the same boundary as commands.main
        code = report(exc)
    _leave(code)


def _leave(code: int) -> None:
    """Exit without the interpreter's teardown (4 ms here): nothing is left open or unwritten."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe: let the normal exit report it
        sys.exit(code)
    os._exit(code)


class _Plain(NamedTuple):
    """A `map add|ip` command line the fast path runs; `request` is None for `ip`."""

    request: MapRequest | None
    options: dict[str, str]
    verbose: int
    quiet: bool


def _read(argv: list[str]) -> _Plain | None:
    """The command when argv is `map add|ip` written plainly, else None (the full CLI's turn)."""
    if len(argv) < 2 or argv[0] != "map" or argv[1] not in ("add", "ip"):
        return None
    command, rest = argv[1], argv[2:]
    operands: list[str] = []
    options: dict[str, str] = {}
    verbose, quiet = 0, False
    index = 0
    while index < len(rest):
        word = rest[index]
        index += 1
        if word in ("-v", "--verbose"):
            verbose += 1
        elif word in ("-q", "--quiet"):
            quiet = True
        elif word.startswith("-"):
            name, equals, value = word.partition("=")
            if name not in _VALUES or name in options or (command == "ip" and name in _ONLY_ADD):
                return None
            if not equals:
                if index == len(rest):
                    return None
                value, index = rest[index], index + 1
            allowed = _VALUES[name]
            if allowed is not None and value not in allowed:
                return None
            options[name] = value
        else:
            operands.append(word)
    if command == "ip":
        return None if operands else _Plain(None, options, verbose, quiet)
    if len(operands) != 1:
        return None
    from portfwd.errors import ConfigError
    from portfwd.oneshot import DEFAULT_LEASE, add_request

    try:
        request = add_request(
            operands[0], options.get("--external"), options.get("--lease", DEFAULT_LEASE), options.get("--to")
        )
    except (ValueError, ConfigError):
        return None
    return _Plain(request, options, verbose, quiet)


def _run(plain: _Plain) -> int:
    from portfwd import oneshot
    from portfwd.cli.console import setup_logging

    options = plain.options
    setup_logging(plain.verbose, plain.quiet, options.get("--log-format", "text"))
    method = options.get("--method", "auto")
    tries = int(options["--tries"]) if "--tries" in options else None
    gateway, upnp_url = options.get("--gateway"), options.get("--upnp-url")
    request = plain.request
    if request is None:
        used, address = oneshot.one_shot(method, gateway, upnp_url, tries, lambda m: m.external_address())
        print(oneshot.address_line(used, address))
    else:
        _, granted = oneshot.one_shot(method, gateway, upnp_url, tries, lambda m: m.add(request))
        print(oneshot.granted_line(granted))
    return 0
