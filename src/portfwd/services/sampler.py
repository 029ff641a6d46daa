"""The once-a-second sampler: rates and idle times in the state, and the open-files check.

A task of the runtime's task group: stop cancels it and waits until it has ended.
"""

from __future__ import annotations

import asyncio

from portfwd.errors import PortfwdError
from portfwd.services.base import Service
from portfwd.services.descriptors import descriptors_warning
from portfwd.state import State

#: Seconds between two samples.
INTERVAL = 1.0
#: Every this many samples the open files are counted (a directory listing: not every second).
DESCRIPTOR_CHECK = 5


class Sampler(Service):
    """Samples `state` now and then every INTERVAL, in a task of `tasks` (the runtime's group)."""

    name = "sampler"

    def __init__(self, state: State, tasks: asyncio.TaskGroup) -> None:
        self.state = state
        self.tasks = tasks
        self._samples = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        """One sample (bench/ replaces it to measure portfwd without accounting)."""
        self.state.sample()
        self._samples += 1
        if self._samples % DESCRIPTOR_CHECK == 0:
            descriptors_warning()

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            self.sample()

    async def start(self) -> list[PortfwdError]:
        self.sample()  # the first at once: the state holds a sample before the first client
        self._task = self.tasks.create_task(self._every_interval(), name="portfwd sampler")
        return []

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})  # waits for the end without raising its CancelledError here
