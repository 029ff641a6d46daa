"""The forward-spec mini-language shared by the CLI and config: `[bind:]port:host:hostport[/proto]`.

It follows OpenSSH's `-L` grammar where OpenSSH has one, adds port ranges, `/udp`, and
`unix:/path` on either side, and turns a spec into the same model a `[[forward]]` table makes,
so that both are validated by one set of rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from portfwd import config
from portfwd.addr import UNIX_PREFIX, split_colons
from portfwd.errors import ConfigError

_SUFFIXES = ("/tcp+udp", "/tcp", "/udp")
_SHAPE = "write [bind:]port:host:hostport[/udp], e.g. 8080:10.0.0.5:80"


def split(spec: str) -> tuple[str, str, str]:
    """Split one spec into config-syntax (listen, connect, protocol) strings.

    Raises ConfigError when the spec has the wrong shape.
    """
    text = spec.strip()
    if not text:
        raise ConfigError("empty forward spec", hint=_SHAPE)
    protocol = "tcp"
    for suffix in _SUFFIXES:
        if text.endswith(suffix):
            protocol = suffix[1:]
            text = text[: -len(suffix)]
            break
    tokens = split_colons(text)
    if tokens[0] == UNIX_PREFIX[:-1]:
        # unix:/listen/path:... — the path runs to the next colon.
        if len(tokens) < 3:
            raise ConfigError(f"{spec!r} has no target", hint="write unix:/path:host:port")
        listen_tokens, rest = tokens[:2], tokens[2:]
    else:
        try:
            unix_at = tokens.index(UNIX_PREFIX[:-1])
        except ValueError:
            unix_at = -1
        if unix_at >= 0:
            listen_tokens, rest = tokens[:unix_at], tokens[unix_at:]
        else:
            if len(tokens) not in (3, 4):
                raise ConfigError(f"{spec!r} is not a forward spec", hint=_SHAPE)
            listen_tokens, rest = tokens[:-2], tokens[-2:]
    if not 1 <= len(listen_tokens) <= 2 or len(rest) < 2:
        raise ConfigError(f"{spec!r} is not a forward spec", hint=_SHAPE)
    listen = ":".join(listen_tokens)
    connect = ":".join(rest)
    return listen, connect, protocol


#: `portfwd forward` flags that set a [[forward]] key of every spec (the key: its flag's name).
RULE_FLAGS = (
    "proxy_protocol",
    "accept_proxy_protocol",
    "trusted_proxies",
    "max_connections",
    "max_connections_per_source",
    "rate",
    "bandwidth",
    "bandwidth_per_connection",
    "transparent",
    "relay",
)


def rules_from_specs(
    specs: Sequence[str],
    allow: Sequence[str] = (),
    deny: Sequence[str] = (),
    options: Mapping[str, Any] | None = None,
    workers: str | None = None,
) -> config.Config:
    """Build a validated Config from CLI specs (`portfwd forward SPEC... --allow --deny`), each
    rule with the `options` given as flags (keys of RULE_FLAGS), and `workers` (top level).

    Raises ConfigError with one line per bad spec, naming the spec by position (or the flag).
    """
    extra = {key: value for key, value in (options or {}).items() if value is not None and value is not False}
    extra = {
        key: list(value) if isinstance(value, tuple) else value for key, value in extra.items() if value != ()
    }
    problems: list[str] = []
    rules = []
    origin: list[int] = []  # rules[i] came from specs[origin[i]]
    for index, spec in enumerate(specs):
        try:
            listen, connect, protocol = split(spec)
        except ConfigError as exc:
            problems.append(f"spec {index + 1}: {exc.line()}")
            continue
        origin.append(index)
        rules.append(
            {
                "listen": listen,
                "connect": connect,
                "protocol": protocol,
                "allow": list(allow),
                "deny": list(deny),
                **extra,
            }
        )
    if not specs:
        problems.append("no forward spec given; write e.g. portfwd forward 8080:10.0.0.5:80")
    result = None
    if problems and not rules:  # every spec is reported above; there is nothing left to validate
        raise ConfigError(problems[0], problems=problems)
    try:
        top: dict[str, Any] = {"forward": rules}
        if workers is not None:
            top["workers"] = workers if workers == "auto" else _number(workers)
        result = config.validate(top)
    except ConfigError as exc:
        for line in exc.problems:
            named = _name_specs(line, specs, origin)
            if named not in problems:
                problems.append(named)
    if problems or result is None:
        raise ConfigError(problems[0], problems=problems)
    return result


def _number(text: str) -> int | str:
    """`--workers 4` as the number config expects (anything else stays text, for its error)."""
    return int(text) if text.isdigit() else text


def _name_specs(line: str, specs: Sequence[str], origin: Sequence[int]) -> str:
    """Rewrite `forward[i].x: ...` as `spec i+1 (text): ...` so CLI users see their own words."""
    if line.startswith("workers: "):
        return "--" + line
    if not line.startswith("forward["):
        return line
    index_text, _, rest = line[len("forward[") :].partition("]")
    if not index_text.isdigit():
        return line
    index = origin[int(index_text)]
    key = rest.lstrip(".").split(":", 1)[0]
    message = rest.split(": ", 1)[1] if ": " in rest else rest
    where = {
        "listen": "listen side",
        "connect": "target",
        "allow": "--allow",
        "deny": "--deny",
        **{flag: "--" + flag.replace("_", "-") for flag in RULE_FLAGS},
    }.get(key.split("[", 1)[0], key)
    if where.startswith("--"):
        return f"{where}: {message}"
    shown = specs[index] if specs[index].isprintable() else repr(specs[index])
    return f"spec {index + 1} ({shown}) {where}: {message}"
