"""What an operator may ask of a running instance through the API; the runtime implements it."""

from __future__ import annotations

from typing import Any, Protocol

#: The modes a rule can be put in: the API's verb, and the mode status shows.
MODES = {"pause": "paused", "drain": "draining", "resume": ""}


class Actions(Protocol):
    """The instance's side of the API's actions. Each raises ActionError (errors.py) when the
    thing asked for does not exist (`missing`) or the action does not apply (`conflict`)."""

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file, as SIGHUP does; the answer `portfwd reload` prints."""
        ...

    async def set_mode(self, rule: str, mode: str) -> None:
        """Put rule `rule` in `mode` ("paused", "draining", or "" to take clients again)."""
        ...

    async def end_session(self, ident: int, reason: str) -> None:
        """Close live session `ident` (any process), saying `reason`."""
        ...

    async def check_backend(self, rule: str, backend: str) -> tuple[bool, str]:
        """Health-check one backend now: (passed, what happened)."""
        ...
