"""Stages 4 to 6: score each (layer, option), search for the plan, and select it against
the best-screened uniform plans that fit on the selection split."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from autotune.agreement import honest_errors
from autotune.allocation import allocate_plan, assignment_options, fitting_uniforms
from autotune.candidates import Candidate, select
from autotune.errors import InfeasibleBudgetError
from autotune.fitness import PlanFitness, windows_of
from autotune.pipeline.config import TuneConfig
from autotune.pipeline.prepare import Data, Setup
from autotune.pipeline.price import Priced, guarded_limits
from autotune.refinement import Decide
from autotune.searching import SearchOutcome, choose_engine, run_search
from autotune.selection import (
    UNIFORM_FINALISTS,
    UNIFORM_REACH,
    Selection,
    choose,
    uniform_finalists,
)
from methods.base import Option
from methods.keep import KeepOption
from methods.registry import method_of
from profilers.cache import SensitivityCache, batches_digest, cache_folder, table_key
from profilers.sensitivity import SensitivityTable
from search import Allocation, ChoiceTable
from search.evolution import Judge
from search.ties import Tied, TiedFitness, tie


@dataclass
class Scored:
    table: SensitivityTable
    cache: SensitivityCache | None


def score(setup: Setup, data: Data, priced: Priced, config: TuneConfig) -> Scored:
    """Every (layer, option) scored by the estimator, from the on-disk cache where it keeps
    one; errors are in the model's own metric, as the search's end-to-end checks are."""
    estimator, options, say = setup.estimator, priced.options, setup.say
    cache = None
    if config.search.cache and estimator.cacheable:
        folder = cache_folder(config.search.cache)
        digest = batches_digest(data.calib.sensitivity)
        cached_as = estimator.cache_name or estimator.name
        cache = SensitivityCache(folder, table_key(data.fingerprint, digest, cached_as))
    metric = setup.executor.metric(data.screening)
    steps = sum(len(o) for o in options.values()) if estimator.steps_per_option else 0
    with say.bar(steps, f"sensitivity ({estimator.name})") as bar:
        if setup.as_is:  # one option per layer, which changes nothing: no error to measure
            table = SensitivityTable(
                metric=metric,
                errors={name: {KeepOption().label: 0.0} for name in options},
                evaluations=0,
                seconds=0.0,
            )
        else:
            decide = _allocator_choice(setup, priced)
            table = setup.executor.sensitivity(
                estimator,
                options,
                data.calib.sensitivity,
                priced.observers,
                cache,
                bar.update,
                lambda errors: decide(honest_errors(errors, options, priced.agreements)),
            )
            table = replace(table, errors=honest_errors(table.errors, options, priced.agreements))
    table.metric = metric
    cached = f", {cache.hits} from the cache" if cache and cache.hits else ""
    say.say(
        f"sensitivity: {table.evaluations} evaluations in {table.seconds:.1f} s"
        f"{cached} (prefix replay {'on' if table.prefix_cached else 'off'})" + _scored_by(table)
    )
    return Scored(table, cache)


def _allocator_choice(setup: Setup, priced: Priced) -> Decide:
    """The allocator's option per layer on a table of errors, within the tune's limits."""

    def decide(errors: dict[str, dict[str, float]]) -> dict[str, str]:
        limits, _ = guarded_limits(priced, errors)
        table, allocation = allocate_plan(setup.budget, priced.costs, limits, errors, priced.ties)
        chosen = assignment_options(priced.costs, table, allocation.assignment)
        return {name: option.label for name, option in chosen.items()}

    return decide


def _scored_by(table: SensitivityTable) -> str:
    """How many pairs each way of scoring gave, where more than one did."""
    if len(table.scored_by) < 2:
        return ""
    ways = ", ".join(f"{count} by {way}" for way, count in table.scored_by.items())
    rounds = f" over {table.rounds} rounds" if table.rounds else ""
    return f"; pairs: {ways}{rounds}"


@dataclass
class Searched:
    """The allocator's plan, the engine's, and the candidates the final choice weighs (the
    searched ones first, then the uniform plans that fit with the least summed errors)."""

    table: ChoiceTable
    allocation: Allocation
    fitness: PlanFitness
    engine: str
    outcome: SearchOutcome
    candidates: list[Candidate]
    searched: int
    # the selection split's error of each plan measured there, kept (the stall judge's too)
    on_selection: PlanFitness

    def options(self, costs: Any, assignment: list[int]) -> dict[str, Option]:
        """The option of each layer in an assignment of this search's table."""
        return assignment_options(costs, self.table, assignment)


def search(
    setup: Setup, data: Data, priced: Priced, scored: Scored, config: TuneConfig
) -> Searched:
    """The allocator's plan on the summed errors, then the engine's search from it. Layers
    the runtime ties (one format for a fused group) are one variable of the search."""
    costs, metric = priced.costs, scored.table.metric
    errors = scored.table.errors
    table, allocation = allocate_plan(setup.budget, costs, priced.limits, errors, priced.ties)
    calib = data.calib
    fitness = PlanFitness(
        setup.executor, table.variables, costs.options, [data.screening, data.calibration], metric
    )
    # the selection split's errors, kept per plan: the search's stall judge and the final
    # choice read the same ones
    on_selection = PlanFitness(
        setup.executor, table.variables, costs.options, [data.selection], metric
    )
    tied = tie(table, priced.ties)
    start = replace(allocation, assignment=tied.reduce(allocation.assignment))
    settings = config.search
    requested = "allocator" if setup.as_is else settings.search
    in_memory = setup.executor.holds_whole_model
    engine = choose_engine(requested, tied.reduced, start, costs.total_weights, in_memory)
    outcome = run_search(
        engine,
        tied.reduced,
        priced.limits,
        TiedFitness(tied, fitness),
        start,
        seed=settings.seed,
        max_evals=settings.max_evals,
        timeout=settings.timeout,
        storage=settings.storage,
        study_name=settings.study_name,
        data_key=f"{data.fingerprint}:{batches_digest(calib.calibration)}:{metric}",
        progress=config.progress,
        judge=Judge(lambda assignment: on_selection(tied.expand(assignment), 0)),
    )
    outcome = _expanded(outcome, tied)
    if outcome.result is not None:
        result = outcome.result
        setup.say.say(
            f"{engine}: {result.evaluations.full_equivalent:.1f} full evaluations in "
            f"{result.seconds:.1f} s, stopped by {result.stopped}"
            + (f", {result.resumed} trials resumed" if result.resumed else "")
        )
    candidates = []
    if outcome.assignment is not None and outcome.assignment != allocation.assignment:
        candidates.append(Candidate(engine, assignment_options(costs, table, outcome.assignment)))
    candidates.append(
        Candidate("allocator", assignment_options(costs, table, allocation.assignment))
    )
    uncalibrated = _uncalibrated_plan(setup, priced, scored)
    if uncalibrated is not None and uncalibrated not in [c.options for c in candidates]:
        candidates.append(Candidate(UNCALIBRATED, uncalibrated))
    searched = len(candidates)
    # uniform plans screened end to end: as many as the selection split may judge, those with
    # the least summed per-layer error (on the demo at 15 MB the sum ranks the 8 best as
    # screening does)
    uniforms = fitting_uniforms(
        costs, table, priced.limits, keep=UNIFORM_FINALISTS, ties=priced.ties
    )
    for name, uniform in uniforms.items():
        candidates.append(Candidate(name, uniform))
    return Searched(table, allocation, fitness, engine, outcome, candidates, searched, on_selection)


def _expanded(outcome: SearchOutcome, tied: Tied) -> SearchOutcome:
    """An engine's outcome on the tied table as one on the layers' table."""
    if outcome.assignment is None:
        return outcome
    result = tied.result(outcome.result) if outcome.result is not None else None
    return replace(outcome, assignment=tied.expand(outcome.assignment), result=result)


UNCALIBRATED = "allocator, uncalibrated options only"


def _uncalibrated_plan(setup: Setup, priced: Priced, scored: Scored) -> dict[str, Option] | None:
    """The allocator's plan without calibrated options (GPTQ, activation-aware, ...), when
    some are offered: calibrated options can fit the calibration data better than they
    generalise, so the final choice weighs this plan too, and adding methods never leaves
    the tune worse on the selection split than leaving them out."""
    costs, errors = priced.costs, scored.table.errors
    calibrated = {
        (name, o.label)
        for name, opts in costs.options.items()
        for o in opts
        if method_of(o).needs_calibration(o)
    }
    if not calibrated:
        return None
    masked = {
        name: {
            label: (float("inf") if (name, label) in calibrated else error)
            for label, error in by_label.items()
        }
        for name, by_label in errors.items()
    }
    try:
        table, allocation = allocate_plan(setup.budget, costs, priced.limits, masked, priced.ties)
    except InfeasibleBudgetError:
        return None
    return assignment_options(costs, table, allocation.assignment)


@dataclass
class Selected:
    """The plan chosen on the selection split, the best uniform plan beside it, that uniform
    plan's held-out error (read only once the choice is made), and the latency checks."""

    chosen: Candidate
    selection: Selection
    best_uniform: Candidate | None
    uniform_heldout: float | None
    # the chosen plan timed where it runs against the latency budgets (autotune.pipeline.confirm)
    latency_checks: list[dict[str, Any]] = field(default_factory=list)


def select_plan(
    setup: Setup, data: Data, scored: Scored, searched: Searched, config: TuneConfig
) -> Selected:
    """Screen the candidates on the calibration data and take the searched plan with the
    least calibration error as the front runner, then keep the plan with the least error on
    the selection split among it, the other searched plans and the best-screened uniform
    plans."""
    say, candidates, count = setup.say, searched.candidates, searched.searched
    fitness, metric, executor = searched.fitness, scored.table.metric, setup.executor
    # the uniform plans are screened (the report plots them) but not checked on the whole
    # calibration set, nor is the uncalibrated plan (last of the searched ones): the front
    # runner is the engine's or the allocator's plan, and the others meet it on the selection
    # split, where the choice is made
    fronts = count - int(candidates[count - 1].name == UNCALIBRATED)
    with say.bar(len(candidates) + fronts, "candidates") as bar:
        front = select(
            candidates, fitness.errors, finalists=0, searched=fronts, progress=bar.update
        )
    by_name = {c.name: c for c in candidates}
    # every searched plan (the engine's, the allocator's, the uncalibrated one) meets the
    # uniform plans that may win there: what fits the calibration data best need not
    # generalise best
    baselines = [c.name for c in candidates[:count] if c.name != front.name]
    screening = {c.name: c.screening_error for c in candidates[count:]}
    baselines += uniform_finalists(screening, within=(front.screening_error, UNIFORM_REACH))
    judged = [front.name, *(n for n in baselines if n != front.name)]
    with say.bar(1, "selection split") as bar:
        found = searched.on_selection.errors([by_name[n].options for n in judged], 0)
        on_selection = dict(zip(judged, found, strict=True))
        bar.update(1)
    selection = choose(
        front.name, baselines, on_selection.__getitem__, windows_of(data.selection.batches)
    )
    chosen = by_name[selection.chosen]
    if chosen.calibration_error is None:  # a uniform or the uncalibrated plan won
        chosen.calibration_error = fitness.error(chosen.options, -1)
    best_uniform = by_name[selection.best_uniform] if selection.best_uniform else None
    # the plan is fixed: only now is the held-out split read, to measure and never to choose
    uniform_heldout = (
        executor.errors({"uniform": best_uniform.options}, data.heldout, metric)["uniform"]
        if config.measure and best_uniform is not None
        else None
    )
    say.say(
        f"chose {chosen.name} (selection error {selection.errors[chosen.name]:.4g}; "
        f"calibration front runner {selection.front_runner})"
    )
    return Selected(chosen, selection, best_uniform, uniform_heldout)
