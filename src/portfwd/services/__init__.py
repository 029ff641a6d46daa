"""The running parts of an instance, one service each, with one small lifecycle (see base.py).

The runtime builds them from a Plan, starts them in order, hands each its part of a reloaded
plan, and stops them; the engine classes they wrap (relay, ssh, kernel, router, metrics,
control) know nothing of one another.
"""
