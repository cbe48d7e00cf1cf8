"""The search space as numbers: variables, their choices, a score and resource costs.

``search`` knows nothing of models. A variable is a layer, a choice one of its options; the
score is what to minimise (an estimated error), and each resource (bytes, seconds, weight
bits) has a cost per choice plus a fixed part outside the variables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ChoiceTable:
    variables: list[str]
    choices: list[list[str]]
    scores: list[np.ndarray]
    costs: dict[str, list[np.ndarray]]
    fixed: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.variables)
        if len(self.choices) != n or len(self.scores) != n:
            raise ValueError("variables, choices and scores must have one entry per variable")
        for resource, per_var in self.costs.items():
            if len(per_var) != n:
                raise ValueError(f"resource {resource!r} needs one cost array per variable")
            for i, arr in enumerate(per_var):
                if len(arr) != len(self.choices[i]):
                    raise ValueError(f"{resource!r}: wrong number of costs for {self.variables[i]}")
        for i, arr in enumerate(self.scores):
            if len(arr) != len(self.choices[i]) or len(arr) == 0:
                raise ValueError(f"{self.variables[i]}: needs one score per choice (at least one)")

    def index(self, variable: int, label: str) -> int:
        return self.choices[variable].index(label)

    def _check(self, assignment: list[int]) -> None:
        if len(assignment) != len(self.variables):
            raise ValueError(
                f"an assignment needs {len(self.variables)} choices, got {len(assignment)}"
            )

    def total(self, resource: str, assignment: list[int]) -> float:
        """Resource use of an assignment (one choice index per variable), fixed part included."""
        self._check(assignment)
        per_var = self.costs[resource]
        return self.fixed.get(resource, 0.0) + sum(
            per_var[i][c].item() for i, c in enumerate(assignment)
        )

    def score(self, assignment: list[int]) -> float:
        self._check(assignment)
        return float(sum(self.scores[i][c] for i, c in enumerate(assignment)))

    def minimum(self, resource: str) -> float:
        """The least of ``resource`` any assignment can use."""
        return self.fixed.get(resource, 0.0) + sum(arr.min().item() for arr in self.costs[resource])

    def labels(self, assignment: list[int]) -> dict[str, str]:
        return {
            v: self.choices[i][c]
            for i, (v, c) in enumerate(zip(self.variables, assignment, strict=True))
        }

    def uniform(self, label: str) -> list[int] | None:
        """The assignment giving every variable the choice ``label``, if all have it."""
        if not all(label in ch for ch in self.choices):
            return None
        return [ch.index(label) for ch in self.choices]

    def fits(self, assignment: list[int], limits: dict[str, float]) -> bool:
        return all(self.total(r, assignment) <= limit for r, limit in limits.items())

    def allowed(self, variable: int) -> list[int]:
        """Choices of a variable that may be taken (finite score)."""
        return [c for c, s in enumerate(self.scores[variable]) if np.isfinite(s)]

    def levels(self, resource: str) -> list[list[int]]:
        """Per variable, its allowed choices ordered by their cost in ``resource`` (then by
        index): level 0 is the cheapest. Engines search over levels so that neighbouring
        levels are neighbouring costs."""
        return [
            sorted(self.allowed(i), key=lambda c, i=i: (float(self.costs[resource][i][c]), c))
            for i in range(len(self.variables))
        ]

    def margins(self, assignment: list[int], limits: dict[str, float]) -> dict[str, float]:
        """How far below each limit an assignment stays (negative: over the limit)."""
        return {r: limit - self.total(r, assignment) for r, limit in limits.items()}

    def repair(
        self, assignment: list[int], limits: dict[str, float], levels: list[list[int]]
    ) -> list[int] | None:
        """The plan brought within ``limits`` by stepping layers down their ``levels``, each
        step the one that adds the least score per unit of excess removed; ``None`` if that
        cannot meet them."""
        plan = list(assignment)
        position = [lv.index(c) for lv, c in zip(levels, plan, strict=True)]
        while True:
            excess = {r: self.total(r, plan) - lim for r, lim in limits.items()}
            excess = {r: e for r, e in excess.items() if e > 0}
            if not excess:
                return plan
            best: tuple[float, int] | None = None
            for i, here in enumerate(position):
                if here == 0:
                    continue
                now, down = plan[i], levels[i][here - 1]
                removed = sum(
                    min(e, float(self.costs[r][i][now] - self.costs[r][i][down]))
                    / max(abs(limits[r]), 1e-12)
                    for r, e in excess.items()
                )
                if removed <= 0:
                    continue
                price = float(self.scores[i][down] - self.scores[i][now]) / removed
                if best is None or price < best[0]:
                    best = (price, i)
            if best is None:
                return None
            i = best[1]
            position[i] -= 1
            plan[i] = levels[i][position[i]]
