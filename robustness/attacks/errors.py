"""The attack engine's exceptions (raised by ``Attack.run``, budgets and the suites)."""
from __future__ import annotations


class AttackError(ValueError):
    """Bad attack parameters or an oracle that cannot serve the attack."""


class BudgetExceeded(RuntimeError):
    """The gradient or query budget given to a run is spent."""


class Stopped(RuntimeError):
    """``should_stop()`` returned True between two batches."""
