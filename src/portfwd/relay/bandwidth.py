"""Bandwidth limits of a rule: the whole rule's and each connection's, each way (to be built)."""

from __future__ import annotations


class Shaper:
    """A rule's bandwidth limits in bytes a second, each way; 0 is no limit."""

    def __init__(self, rule_rate: float, connection_rate: float) -> None:
        self.rule_rate = rule_rate
        self.connection_rate = connection_rate
