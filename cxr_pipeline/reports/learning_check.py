"""The learning check's choice among candidate recipes, kept apart from the benchmark that trains them
(``benchmarks/bench_vlm.py --learning``) so that a test can run the choice on recorded or fixture scores:
the recipe the README's figure comes from is the one this function picks, not a name typed by hand."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def choose_candidate(scores: Mapping[str, float]) -> str:
    """The candidate with the highest validate score; a tie goes to the first listed (the order of the
    candidates file), so that a tie never silently favours a later, more elaborate recipe. NaN never wins."""
    if not scores:
        raise ValueError("choose_candidate: no candidate scores")
    best, best_score = None, float("-inf")
    for name, score in scores.items():
        if score == score and score > best_score:  # score == score: not NaN
            best, best_score = name, score
    if best is None:
        raise ValueError(f"choose_candidate: every score is NaN ({sorted(scores)})")
    return best


def recipe_holds(recipe: Any, overlay: Mapping[str, Any]) -> list[str]:
    """The fields of ``overlay`` (a candidate's ``report_adapter`` settings) that the resolved ``recipe``
    does not hold, as ``field: recipe value != candidate value``; empty when the recipe is the candidate."""
    return [f"{k}: {getattr(recipe, k, None)!r} != {v!r}" for k, v in overlay.items() if getattr(recipe, k, None) != v]


def choose_within_budget(scores: Mapping[str, float], seconds: Mapping[str, float], budget_s: float) -> str:
    """``choose_candidate`` among the candidates whose recorded ``seconds`` (base building and training) fit
    ``budget_s``: the demo's recipe must train in its time, so a better recipe that overran it is not chosen."""
    eligible = {name: score for name, score in scores.items() if seconds[name] <= budget_s}
    if not eligible:
        raise ValueError(f"choose_within_budget: no candidate within {budget_s} s ({dict(seconds)})")
    return choose_candidate(eligible)
