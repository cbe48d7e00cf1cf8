"""Variables that must take one label together: a reduced table the engines search.

Some runtimes fuse several layers into one kernel and need them to share one format (vLLM
runs a block's query, key and value projections as one matrix). Each group of tied
variables becomes one variable of a reduced :class:`ChoiceTable`: its choices are the labels
every member offers (in the first member's order), its score and costs the members' sums,
so that the allocator and every engine search it unchanged; their assignments are expanded
back to the full table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from search.allocator import Allocation
from search.evolution import SearchResult
from search.fitness import Fitness
from search.space import ChoiceTable


@dataclass(frozen=True)
class Tied:
    """``table`` with ``members[k]`` (indices into it) taking one label as the reduced
    table's variable ``k``; ``picks[k][c]`` is each member's choice for its choice ``c``."""

    table: ChoiceTable
    reduced: ChoiceTable
    members: list[list[int]]
    picks: list[list[list[int]]]

    def expand(self, assignment: Sequence[int]) -> list[int]:
        """The full table's assignment of a reduced one."""
        full = [0] * len(self.table.variables)
        for k, choice in enumerate(assignment):
            for member, pick in zip(self.members[k], self.picks[k][choice], strict=True):
                full[member] = pick
        return full

    def reduce(self, assignment: Sequence[int]) -> list[int] | None:
        """The reduced assignment of a full one, or ``None`` if it splits a group."""
        reduced = []
        for k, members in enumerate(self.members):
            chosen = [assignment[m] for m in members]
            try:
                reduced.append(self.picks[k].index(chosen))
            except ValueError:
                return None
        return reduced

    def allocation(self, allocation: Allocation) -> Allocation:
        """An allocation of the reduced table as one of the full table."""
        return replace(allocation, assignment=self.expand(allocation.assignment))

    def result(self, result: SearchResult) -> SearchResult:
        """An engine's result on the reduced table as one on the full table."""
        pareto = [{**p, "assignment": self.expand(p["assignment"])} for p in result.pareto]
        return replace(result, assignment=self.expand(result.assignment), pareto=pareto)


def tie(table: ChoiceTable, groups: Sequence[Sequence[str]]) -> Tied:
    """``table`` with each group of variables (by name; a variable in at most one group)
    taking one label; a label some member lacks, or cannot take, is never chosen."""
    index = {name: i for i, name in enumerate(table.variables)}
    leader: dict[int, list[int]] = {}
    seen: set[int] = set()
    for group in groups:
        unknown = [name for name in group if name not in index]
        if unknown:
            raise ValueError(f"tied variables not in the table: {', '.join(unknown)}")
        members = [index[name] for name in group]
        if seen & set(members) or len(set(members)) != len(members):
            raise ValueError(f"a variable is tied twice: {', '.join(group)}")
        seen |= set(members)
        leader[min(members)] = sorted(members)
    all_members: list[list[int]] = []
    for i in range(len(table.variables)):
        if i in leader:
            all_members.append(leader[i])
        elif i not in seen:
            all_members.append([i])
    variables, choices, scores, picks = [], [], [], []
    costs: dict[str, list[np.ndarray]] = {r: [] for r in table.costs}
    for members in all_members:
        shared = [
            label
            for label in table.choices[members[0]]
            if all(label in table.choices[m] for m in members)
        ]
        picked = [[table.index(m, label) for m in members] for label in shared]
        variables.append("+".join(table.variables[m] for m in members))
        choices.append(shared)
        picks.append(picked)
        scores.append(
            np.array(
                [sum(table.scores[m][c] for m, c in zip(members, p, strict=True)) for p in picked]
            )
        )
        for resource, per_var in table.costs.items():
            costs[resource].append(
                np.array(
                    [sum(per_var[m][c] for m, c in zip(members, p, strict=True)) for p in picked]
                )
            )
        if not any(np.isfinite(scores[-1])):
            names = ", ".join(table.variables[m] for m in members)
            raise ValueError(f"tied variables {names} share no choice they can all take")
    reduced = ChoiceTable(variables, choices, scores, costs, dict(table.fixed))
    return Tied(table, reduced, all_members, picks)


class TiedFitness:
    """A fitness of the full table as one of the reduced table (see :mod:`search.fitness`)."""

    def __init__(self, tied: Tied, fitness: Fitness) -> None:
        self.tied = tied
        self.fitness = fitness
        self.costs = fitness.costs

    def __call__(self, assignment: list[int], fidelity: int) -> float:
        return self.fitness(self.tied.expand(assignment), fidelity)
