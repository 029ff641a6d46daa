"""The kernel relays' table in the kernel: load it in one nft transaction, read its counters,
remove it; and which rule an nft refusal is about.

relay.py makes the table's text (pure); this module is its only talk with `nft`, through
nft.py, as the gateway's plan (gwplan.py) and its calls (nft.py, gateway.py) are apart.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from typing import Any

from portfwd.kernel import nft
from portfwd.kernel.relay import (
    DENIED,
    DOWN,
    DRAINING,
    FAMILY,
    PAUSED,
    UP,
    KernelRelayError,
    check_table,
    document,
)

# --------------------------------------------------------------------------- reading counters


@dataclass(frozen=True, slots=True)
class Counts:
    """What the kernel counted for one rule: new flows, refused first packets, bytes each way."""

    connections: int = 0
    denied: int = 0
    bytes_up: int = 0  #: client to target, IP bytes (headers included)
    bytes_down: int = 0
    draining: int = 0  #: first packets refused while an operator drained the rule


#: A counter's comment suffix, and the field of Counts it fills.
_COUNTED = {"": "connections", DENIED: "denied", UP: "bytes_up", DOWN: "bytes_down", DRAINING: "draining"}


def counts(listing: dict[str, Any]) -> dict[str, Counts]:
    """The counters of every rule, by label (`comment(rule)`), from `listing()` (or from
    `nft -j list table inet <table>`, which holds the same counter objects).

    A rule's NAT rules count into its `flows_N` counter (each flow's first packet only), its
    guard rules into `denied_N` (the first packets they refuse: a client retrying its SYN counts
    again), its count chain into `up_N` and `down_N` (every packet, each way apart; bytes), a
    draining rule's refusals into `draining_N` (first packets, as `denied_N`). Each
    counter's comment is the rule's label with the suffix of what it counts.
    """
    found: dict[str, dict[str, int]] = {}
    for item in listing.get("nftables", []):
        counter = item.get("counter") if isinstance(item, dict) else None
        if not isinstance(counter, dict) or not counter.get("comment"):
            continue
        text = str(counter["comment"])
        suffix = next((each for each in _COUNTED if each and text.endswith(each)), "")
        name = _COUNTED[suffix]
        value = int(counter.get("bytes" if suffix in (UP, DOWN) else "packets", 0))
        values = found.setdefault(text.removesuffix(suffix) if suffix else text, {})
        values[name] = values.get(name, 0) + value
    return {label: Counts(**values) for label, values in found.items()}


def _nft(*args: str, payload: str | None = None) -> subprocess.CompletedProcess[str]:
    return nft.run(*args, payload=payload, error=KernelRelayError)


_COMMENT = re.compile(r'comment "([^"]*)"')
_DECLARED = re.compile(r"^\s*(?:set|map) (\w+) \{")


def explain(text: str, stderr: str) -> tuple[str, str] | None:
    """(rule label, what nft said) for nft's first error in the document `text`, if traceable.

    A rule line carries its label as a comment; a set or map line is traced to the first rule
    line that uses it.
    """
    error = nft.error_at(text, stderr)
    if error is None:
        return None
    line, _, _, message, culprit = error
    lines = text.splitlines()
    what = f"{message} ({culprit})" if culprit and len(culprit) < 80 else message
    if named := _COMMENT.search(line):
        return _label(named[1]), what
    if declared := _DECLARED.match(line):
        for other in lines:
            if f"@{declared[1]} " in other and (named := _COMMENT.search(other)):
                return _label(named[1]), what
    return None


def _label(comment_text: str) -> str:
    """The rule's label in a comment, without the guard or direction suffix."""
    for suffix in (DENIED, UP, DOWN, DRAINING, PAUSED):
        comment_text = comment_text.removesuffix(suffix)
    return comment_text


def apply(ruleset: str, table: str, *, check_only: bool = False) -> None:
    """Load `ruleset` as `table inet <table>` atomically, replacing what was there (or only check).

    Raises KernelRelayError naming the rule nft refused (or nft's first error line); then
    nothing changed.
    """
    text = document(ruleset, table)
    result = _nft(*(["-c", "-f", "-"] if check_only else ["-f", "-"]), payload=text)
    if result.returncode == 0:
        return
    explained = explain(text, result.stderr)
    if explained is not None:
        label, what = explained
        raise KernelRelayError(f"{label}: nft refused it: {what}; nothing changed")
    raise KernelRelayError(
        f"nft refused table {FAMILY} {table}; nothing changed: {nft.one_line(result.stderr)}"
    )


def listing(table: str) -> dict[str, Any] | None:
    """The table's counters, `nft -j list counters table inet <table>` parsed (what `counts()`
    reads), or None when absent. Only the counters: their cost does not grow with the maps and
    chains, and a refresh reads them every few seconds."""
    check_table(table)
    result = _nft("-j", "list", "counters", "table", FAMILY, table)
    if result.returncode != 0:
        return None
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def remove(table: str) -> bool:
    """Delete `table inet <table>` (only it). Returns False when it was not there.

    Raises KernelRelayError when nft fails otherwise.
    """
    check_table(table)
    result = _nft("delete", "table", FAMILY, table)
    if result.returncode == 0:
        return True
    if "No such file or directory" in result.stderr:
        return False
    raise KernelRelayError(f"nft could not delete table {FAMILY} {table}: {nft.one_line(result.stderr)}")
