"""Budgets: a budget control's twin (the run whose optimizer steps it takes) and the epochs a run used, decided here
once for the recipe, the runner's jobs and estimate, and the evidence."""
from .records import run_name

__all__ = ["LONG_BUDGET", "epochs_run", "twin_name", "twin_epochs"]

LONG_BUDGET = 2  # a long twin's: every budget of its arm's run doubled (kd_lib.evidence.saturation)


def epochs_run(record: dict) -> int:
    "The epochs a run's record says it trained, all its fits together."
    return sum(s.get("epochs_run", 0) for s in record.get("stages") or [])


def twin_name(config, budget_of: str) -> str:
    """The run name of the budget twin of `config`, a budget control taking method `budget_of`'s budget: that
    method's run of the same dataset, student, fraction and seed, at budget 1."""
    return run_name(dict(config.params(), method=budget_of, budget=1))


def twin_epochs(config, twin_epochs_run: int) -> int:
    "The epochs a budget control trains: those its twin used in all, times its own `budget` (a long twin's: twice)."
    return config.scaled(twin_epochs_run)
