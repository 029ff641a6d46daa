"""The lifecycle every running part shares, so that the runtime starts, drains and stops them alike.

A service starts (a failing item is reported and skipped; the rest keeps running), stops
accepting when shutdown begins (live sessions may still drain), and stops. The parts a reload
can change also `retire` what a new plan no longer has and `apply` what it adds: the runtime
retires in every service before it applies in any, so a port a tunnel gives up is free for a
rule the same reload adds.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from portfwd.errors import PortfwdError

Part = TypeVar("Part")


@dataclass(frozen=True, slots=True)
class Change:
    """What a reload did to one service: items kept, removed and started, and what failed."""

    kept: int = 0
    removed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()  #: labels of the new items that started
    tried: int = 0  #: new items, started or not
    failures: tuple[PortfwdError, ...] = ()


@dataclass(frozen=True, slots=True)
class Owned:
    """Files and directories a service made as root: handed to the user, removed at exit."""

    files: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)


class Service(abc.ABC):
    """One running part: start, stop accepting, stop. Subclasses say what each step means."""

    name: str

    @abc.abstractmethod
    async def start(self) -> list[PortfwdError]:
        """Start every item; returns the failures (logged already). Raises only what must end
        the process before it serves (the control socket of an instance that runs already)."""

    async def stop_accepting(self) -> None:  # noqa: B027 - most parts have nothing to close early
        """Shutdown begins: take no new clients; live sessions may still drain."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """End everything the service runs and release what it holds; safe to call twice."""

    @property
    def active(self) -> bool:
        """Whether it runs something worth serving for (the control socket alone is not)."""
        return False

    def owned(self) -> Owned:
        """The files and directories it made, for the privilege drop and the janitor."""
        return Owned()


class Reloadable(Service, Generic[Part]):
    """A service a reload changes: it is handed its part of the new plan, in two steps."""

    @abc.abstractmethod
    async def retire(self, part: Part) -> Change:
        """Stop the items `part` no longer has; returns them as `removed`."""

    @abc.abstractmethod
    async def apply(self, part: Part) -> Change:
        """Make the running items those of `part` (retiring first if not done yet): starts the
        new ones and returns kept, started and failed."""
