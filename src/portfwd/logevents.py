"""Log events: a name and typed fields for each line that matters, the same in both log formats.

A line is written as before, with its fields beside it:

    log.info("%s: %s -> %s closed (%s) ...", label, client, target, reason, ...,
             extra=event("session.closed", rule=label, client=client, target=target, ...))

The text formatter writes the sentence, for people. The JSON formatter (`--log-format json`)
writes one object a line with `event` and every field as keys of their own beside `msg`, so a
machine reads `bytes_up` or `reason` without parsing the sentence (and without a regular
expression that breaks when the wording changes). Every line has an `event`: a line written
without fields is `"log"`, so a reader can tell "no event" from "an event it does not know".

Fields are plain JSON values (text, numbers, booleans, None). They may come from the network
(a client's address, a server's refusal): the JSON encoder escapes what must be, and the text
formatter escapes the sentence (printable.py).

Not structlog or python-json-logger: one small formatter and this helper cover what portfwd
logs, with nothing between a hot path's `isEnabledFor` check and the standard library.
"""

from __future__ import annotations

import logging
from typing import Any

#: The LogRecord attributes an event's name and fields travel in (`extra=` sets them).
EVENT = "portfwd_event"
FIELDS = "portfwd_fields"

#: Keys the JSON formatter writes itself; a field may not take one of them.
RESERVED = frozenset({"ts", "level", "logger", "event", "msg", "exc"})

JsonValue = str | int | float | bool | None


def event(name: str, /, **fields: JsonValue) -> dict[str, Any]:
    """The `extra=` of a log call: the event's name and its fields."""
    return {EVENT: name, FIELDS: fields}


def record_event(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    """A record's event name and fields (`"log"` and none for a line written without them)."""
    return getattr(record, EVENT, "log"), getattr(record, FIELDS, None) or {}
