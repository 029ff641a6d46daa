"""portfwd's own exception types: one per layer, each with a one-line message a person can act on.

Foreign errors (OSError, pydantic's, tomllib's) are translated into these at the edge of the
layer that meets them, always with `raise ... from exc`, so the CLI only ever sees these.
"""

from __future__ import annotations


class PortfwdError(Exception):
    """Base of every error portfwd reports to a person.

    `field` is the config path or CLI argument that was wrong (`forward[1].connect`), `hint` is
    the fix. `str(err)` joins them into the one line the CLI prints after `portfwd: `.
    """

    exit_code = 1

    def __init__(self, message: str, *, field: str | None = None, hint: str | None = None) -> None:
        self.message = message
        self.field = field
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        """Return the single line shown to the user: `field: message; hint`."""
        text = self.message
        if self.hint:
            text = f"{text}; {self.hint}"
        if self.field:
            text = f"{self.field}: {text}"
        return text


class UsageError(PortfwdError):
    """A bad command line or config value: the user must change what they wrote (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """One or more problems in a config file or a forward spec.

    `problems` holds every line found, so `portfwd check` can print all of them at once.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        hint: str | None = None,
        problems: list[str] | None = None,
    ) -> None:
        super().__init__(message, field=field, hint=hint)
        self.problems = problems if problems is not None else [self.line()]


class RuntimeFailure(PortfwdError):
    """Something failed while running (exit 1): a bind, a privilege drop, a missing peer."""


class ActionError(RuntimeFailure):
    """An operator's action (web API) that cannot be done: `missing` (no such rule, session or
    backend) or `conflict` (it exists, but the action does not apply to it)."""

    def __init__(self, message: str, *, kind: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.kind = kind


class BindError(RuntimeFailure):
    """A listener could not be opened; names the rule and the errno in words."""


class UpstreamError(RuntimeFailure):
    """The target of a forward could not be reached; `reason` is a short machine label."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RouterError(RuntimeFailure):
    """The home router refused, did not answer, or answered nonsense to a port-mapping request.

    `reason` is a short label (`conflict`, `refused`, `unreachable`, `unsupported`, `bad-reply`)
    so `method = "auto"` can tell "try the next method" from "the answer is no".
    """

    def __init__(self, message: str, *, reason: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason
