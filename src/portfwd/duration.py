"""Durations as people write them in configs and on command lines: "90s", "10m", "2h".

Apart from config.py so that quick commands (`portfwd map add --lease 2h`) need not import
pydantic and the config models to read one.
"""

from __future__ import annotations

import math
import re

from portfwd.errors import ConfigError

#: The longest duration accepted anywhere: a year. Longer ones are typos, and timers overflow.
MAX_SECONDS = 365 * 86400.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Parse `"90s"`, `"10m"`, `"2h"`, `"500ms"`, `"1d"` or a number of seconds.

    Raises ConfigError for anything else, for a duration that is not positive, or for one that
    is not finite or longer than a year.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{value!r} is not a duration", hint='write a duration such as "90s"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ConfigError(
            f"{value!r} is not a duration", hint='write a duration such as "90s", "10m" or "2h"'
        )
    if not seconds > 0:
        raise ConfigError(f"duration {value!r} must be more than zero")
    if not math.isfinite(seconds) or seconds > MAX_SECONDS:
        raise ConfigError(f"duration {value!r} is too long", hint='the longest is "365d"')
    return seconds
