"""The select metric of a round, read from its results.json, and the choice of the best round."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal


def flat_metrics(benchmarks: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number of results.json's `benchmarks`, by dotted path ("pope.adversarial.f1")."""
    flat: dict[str, float] = {}
    for name, value in benchmarks.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flat_metrics(value, key + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[key] = value
    return flat


def metric_value(benchmarks: Mapping[str, Any], path: str, where: str) -> float:
    """The number at dotted `path` in `benchmarks`; ValueError naming what `where` holds."""
    value: Any = benchmarks
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        known = ", ".join(sorted(flat_metrics(benchmarks)))
        raise ValueError(
            f"rounds.select_metric {path!r} is not a number in {where}; it holds: {known}"
        )
    return float(value)


def best_round(values: Mapping[int, float], mode: Literal["min", "max"]) -> int:
    """The round with the lowest (mode "min") or highest ("max") value.

    A tie goes to the earliest round (the fewest steps away from the base model); a NaN never
    wins, and only NaNs raise ValueError.
    """
    scored = {k: v for k, v in values.items() if not math.isnan(v)}
    if not scored:
        raise ValueError(f"no round has a select metric to compare (values: {dict(values)})")
    sign = 1.0 if mode == "min" else -1.0
    return min(sorted(scored), key=lambda k: sign * scored[k])
