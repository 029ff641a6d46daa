"""Integration-test guard: an exception swallowed by the event loop fails the test."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def no_swallowed_loop_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """asyncio logs (and otherwise hides) exceptions raised in callbacks; treat them as failures."""
    caplog.set_level(logging.INFO)
    yield
    errors = [r for r in caplog.get_records("call") if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not errors, f"the event loop swallowed: {errors[0].getMessage()}"
