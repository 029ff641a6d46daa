"""What an operator asks through the web API, carried out over the running services.

The one service-level module that knows several services (the rules, their workers, the
kernel relays): an action on a rule must reach every process that relays it, and say plainly
when the rule is not one the action applies to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from portfwd.errors import ActionError
from portfwd.services.kernelrules import KernelRules
from portfwd.services.rules import RuleSet
from portfwd.services.workers import Workers
from portfwd.state import State


class Operator:
    """The instance's side of the web API's actions (web/actions.py's `Actions`)."""

    def __init__(
        self,
        state: State,
        rules: RuleSet,
        workers: Workers,
        kernel: KernelRules,
        reloader: Callable[[], Awaitable[dict[str, Any]]] | None,
    ) -> None:
        self.state = state
        self.rules = rules
        self.workers = workers
        self.kernel = kernel
        self.reloader = reloader
        self._reloads: set[asyncio.Future[dict[str, Any]]] = set()

    async def reload(self) -> dict[str, Any]:
        """Reload in a task of its own: a reload that changes [web] replaces the server whose
        request asked for it, cancelling that request; the reload itself must go on."""
        if self.reloader is None:
            raise ActionError("this instance runs without a config file; nothing to reload", kind="conflict")
        task = asyncio.ensure_future(self.reloader())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)
        return await asyncio.shield(task)

    async def set_mode(self, rule: str, mode: str) -> None:
        if self.kernel.knows(rule):  # the NAT chains hold the mode; no process of ours accepts
            await self.kernel.set_mode(rule, mode)
        else:
            self.rules.set_mode(rule, mode)
        # The workers keep every rule's mode by name (a kernel rule's too: a reload may move a
        # rule of that name to them), so a resume must reach them as the pause did.
        await self.workers.set_mode(rule, mode)

    async def end_session(self, ident: int, reason: str) -> None:
        if self.state.end(ident, reason) or await self.workers.end_session(ident, reason):
            return
        raise ActionError(f"no live session {ident}", kind="missing", hint="it may have closed already")

    async def check_backend(self, rule: str, backend: str) -> tuple[bool, str]:
        if self.kernel.knows(rule):
            raise ActionError(f"rule {rule!r} is relayed by the kernel and has no backends", kind="conflict")
        answer = await self.rules.check_backend(rule, backend)
        await self.workers.settled()  # a verdict it sent is followed in every worker by now
        return answer
