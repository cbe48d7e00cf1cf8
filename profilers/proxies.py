"""Cheap proxies of the end-to-end sensitivity table, and rank agreement between tables.

:func:`profilers.sensitivity.measure_sensitivity` runs the model once per (layer, option).
The proxies here run it a fixed number of times, whatever the number of options:

* :func:`local_error_table`: each layer's own output error on its recorded inputs
  (``sum (f'(X) - f(X))^2 / sum f(X)^2``), after one recording pass.
* :func:`fisher_table`: a second-order estimate of the output error from the weight
  perturbation, ``sum_ij F_ij (W'_ij - W_ij)^2 / Z`` with ``F`` the diagonal of the Fisher /
  Gauss-Newton matrix of the model output, accumulated for all layers in a few backward passes.

Both return a :class:`SensitivityTable` like the end-to-end one, so :func:`spearman` and
:func:`rank_agreement_by_layer` can judge how well a proxy orders the choices.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from scipy import stats
from torch import nn

from methods.base import InputRounding, LayerShape, Option, is_weight_layer, linear_weight
from methods.errors import OptionError
from methods.registry import convert_each, method_of
from methods.smoothquant import W8A8Linear
from profilers.converted import ConvertedModules
from profilers.execution.observe import (
    Observers,
    collect_observers,
    needs_statistics,
    run_hooked,
)
from profilers.fisher import fisher_diagonals
from profilers.input_rounding import rounding_error, rounding_noise
from profilers.sensitivity import SensitivityTable

Batch = dict[str, torch.Tensor]

NO_INPUT = "the layer received no input on the calibration batches"


def _converted(
    layer: str,
    module: nn.Module,
    options: Sequence[Option],
    observers: Observers | None,
    skipped: dict[str, dict[str, str]],
) -> Iterator[tuple[Option, nn.Module]]:
    """Each option's converted module; a refused one is left out, its reason under
    ``skipped``."""
    for option, compressed in convert_each(
        module, options, lambda o: observers.get((layer, o.label)) if observers else None
    ):
        if isinstance(compressed, OptionError):
            skipped.setdefault(layer, {})[option.label] = str(compressed)
        else:
            yield option, compressed


def _simulated(
    layer: str,
    module: nn.Module,
    options: Sequence[Option],
    observers: Observers | None,
    skipped: dict[str, dict[str, str]],
    rows: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], list[Option]]:
    """The float weight (of ``rows`` only, if given) of each option whose method finds it
    without converting (by label), and the options left to convert; a refused one is left
    out, its reason under ``skipped``."""
    found: dict[str, torch.Tensor] = {}
    rest: list[Option] = []
    for option in options:
        observer = observers.get((layer, option.label)) if observers else None
        try:
            weight = method_of(option).simulated_weight(module, option, observer, rows)
        except OptionError as exc:
            skipped.setdefault(layer, {})[option.label] = str(exc)
            continue
        if weight is None:
            rest.append(option)
        else:
            found[option.label] = weight
    return found, rest


def _live_rows(diagonal: torch.Tensor) -> torch.Tensor | None:
    """The rows of a Fisher diagonal that are not all zero, when they are fewer than half
    (an embedding table whose rows the calibration tokens mostly never read); ``None``
    otherwise."""
    live = diagonal.reshape(diagonal.shape[0], -1).ne(0).any(dim=1)
    count = int(live.sum())
    return live.nonzero().squeeze(1) if 2 * count < live.numel() else None


def _observers(
    model: nn.Module,
    options: Mapping[str, Sequence[Option]],
    batches: Sequence[Batch],
    observers: Observers | None,
) -> tuple[Observers | None, int]:
    """The given observers, or ones collected in one pass when options need statistics."""
    if observers is None and needs_statistics(options):
        return collect_observers(model, options, batches), 1
    return observers, 0


# --- layer-local output error ----------------------------------------------------------------


def capture_inputs(
    model: nn.Module, layers: Sequence[str], batches: Sequence[Batch], max_rows: int
) -> dict[str, torch.Tensor]:
    """The first ``max_rows`` input rows of each layer (index vectors for embeddings)."""
    parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    counts = dict.fromkeys(layers, 0)

    def recorder(layer: str) -> Callable[..., None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
        ) -> None:
            room = max_rows - counts[layer]
            inputs = [*args, *kwargs.values()]
            if room <= 0 or not inputs or not isinstance(inputs[0], torch.Tensor):
                return
            x = inputs[0].detach()
            rows = x.reshape(-1) if isinstance(module, nn.Embedding) else x.reshape(-1, x.shape[-1])
            rows = rows[:room].clone()
            parts[layer].append(rows)
            counts[layer] += rows.shape[0]

        return hook

    handles = [
        model.get_submodule(layer).register_forward_hook(recorder(layer), with_kwargs=True)
        for layer in layers
    ]
    run_hooked(model, batches, handles)
    return {layer: torch.cat(rows) for layer, rows in parts.items() if rows}


def local_error_table(
    model: nn.Module,
    options: Mapping[str, list[Option]],
    batches: list[Batch],
    observers: Observers | None = None,
    max_rows: int = 2048,
) -> SensitivityTable:
    """Each layer's own normalised output error ``sum (f'(X) - f(X))^2 / sum f(X)^2`` under
    each option, on the first ``max_rows`` inputs the layer saw on ``batches``.

    ``f`` is the layer, ``f'`` the module its method's ``convert`` builds. Inputs are recorded
    in one pass; options that need statistics take them from ``observers`` (collected in one
    more pass when none are given). The error is the layer's own: how much the rest of the
    model amplifies it is not in it. ``evaluations`` counts passes over ``batches``.
    ``model`` is left as it was.
    """
    start = time.perf_counter()
    if not batches:
        raise ValueError("local_error_table needs at least one batch")
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    observers, evaluations = _observers(model, options, batches, observers)
    inputs = capture_inputs(model, list(options), batches, max_rows)
    evaluations += 1
    errors: dict[str, dict[str, float]] = {}
    skipped: dict[str, dict[str, str]] = {}
    for layer, layer_options in options.items():
        errors[layer] = {}
        module = model.get_submodule(layer)
        x = inputs.get(layer)
        if x is None:
            skipped[layer] = {option.label: NO_INPUT for option in layer_options}
            continue
        with torch.inference_mode():
            reference = module(x).float()
        norm = float(reference.pow(2).sum())
        for option, compressed in _converted(layer, module, layer_options, observers, skipped):
            if compressed is module:
                errors[layer][option.label] = 0.0
                continue
            with torch.inference_mode():
                diff = float((compressed(x).float() - reference).pow(2).sum())
            errors[layer][option.label] = diff / norm if norm > 0 else 0.0
    return SensitivityTable(
        metric="local-nmse",
        errors=errors,
        evaluations=evaluations,
        seconds=time.perf_counter() - start,
        skipped=skipped,
        prefix_cached=False,
    )


# --- Fisher / Gauss-Newton estimate -----------------------------------------------------------


def effective_weight(module: nn.Module) -> torch.Tensor | None:
    """The float32 weight a converted module computes with (``[out, in]`` for linear layers,
    the table for embeddings), or ``None`` when it offers no way to get one.

    W8A8 multiplies weight columns by its smoothing factors and divides inputs by them, so its
    dequantised weight is divided back column by column.
    """
    dequantize = getattr(module, "dequantize", None)
    if callable(dequantize):
        weight = dequantize(torch.float32)
        if isinstance(module, W8A8Linear) and module.smooth is not None:
            weight = weight / module.smooth.float()[None, :]
        return weight
    if is_weight_layer(module):
        return linear_weight(module).float()
    return None


def fisher_table(
    model: nn.Module,
    options: Mapping[str, list[Option]],
    batches: list[Batch],
    observers: Observers | None = None,
    samples: int = 4,
    seed: int = 0,
    keep: ConvertedModules | None = None,
) -> SensitivityTable:
    """Second-order estimate of the end-to-end error: ``sum_ij F_ij (W'_ij - W_ij)^2 / Z``.

    ``W'`` is the float weight of the module the option's ``convert`` builds (see
    :func:`effective_weight`; found without converting where the method's
    ``simulated_weight`` gives it), ``F`` the diagonal of the Fisher / Gauss-Newton matrix of the
    model output with respect to the layer's weight, accumulated for all layers in the same
    backward passes (``samples`` per batch, drawn from a generator seeded by ``seed``):

    * models with ``logits`` (metric ``kl``): the true Fisher, with labels drawn from the
      model's own softmax at each token; ``KL ~ 0.5 dW^T F dW`` per token, ``Z`` = tokens.
    * other models (``nmse``): the Gauss-Newton diagonal ``E_v[(d(v . y)/dW)^2]`` with Gaussian
      ``v`` shaped like each selected output ``y``, and ``Z = sum y^2`` per output, averaged
      over outputs as :class:`profilers.quality.OutputError` does.

    Where a method rounds a linear layer's inputs (:meth:`Method.input_rounding`, such as
    llama.cpp's 8-bit activation blocks), ``sum_ij F_ij W'_ij^2 r_j`` is added, ``r_j`` being
    input column ``j``'s rounding noise over its power (:mod:`profilers.input_rounding`; one
    more forward pass). W8A8's activation quantisation is not in it.
    The gradient is taken with respect to the weight tensor, so a weight shared by several
    modules counts all its uses. Options whose module has no float weight are ``skipped``.
    ``evaluations`` counts sweeps over ``batches``: one forward (two for ``nmse``, whose
    normaliser needs all outputs first), ``samples`` backward, and one forward where inputs
    are rounded.
    ``model`` is left as it was: its ``requires_grad`` flags are set only while this runs,
    and parameter ``.grad`` fields are not touched. Converted modules are kept in ``keep``
    (up to its cap) when one is given.
    """
    start = time.perf_counter()
    if not batches:
        raise ValueError("fisher_table needs at least one batch")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    observers, evaluations = _observers(model, options, batches, observers)
    diagonals, metric, sweeps = fisher_diagonals(model, list(options), batches, samples, seed)
    roundings = _input_roundings(model, options)
    distinct = {
        n: list({r.name: r for r in by_label.values()}.values())
        for n, by_label in roundings.items()
    }
    noise = rounding_noise(model, distinct, batches) if roundings else {}
    evaluations += 1 if roundings else 0
    errors: dict[str, dict[str, float]] = {}
    skipped: dict[str, dict[str, str]] = {}
    for layer, layer_options in options.items():
        errors[layer] = {}
        module = model.get_submodule(layer)
        weight = linear_weight(module).float()
        diagonal = diagonals[layer]
        rows = _live_rows(diagonal)
        simulated, rest = _simulated(layer, module, layer_options, observers, skipped, rows)
        live = (diagonal, weight) if rows is None else (diagonal[rows], weight[rows])
        measured = noise.get(layer, {})
        ratio = {
            label: measured[rounding.name]
            for label, rounding in roundings.get(layer, {}).items()
            if rounding.name in measured
        }
        for label, perturbed in simulated.items():
            errors[layer][label] = float((live[0] * (perturbed - live[1]).pow(2)).sum())
            if label in ratio:
                errors[layer][label] += rounding_error(live[0], perturbed, ratio[label])
        for option, compressed in _converted(layer, module, rest, observers, skipped):
            if compressed is module:
                errors[layer][option.label] = 0.0
                continue
            if keep is not None:
                keep.put(layer, option.label, compressed, module)
            perturbed = effective_weight(compressed)
            if perturbed is None or perturbed.shape != weight.shape:
                reason = (
                    f"{type(compressed).__name__} offers no float weight"
                    if perturbed is None
                    else f"float weight of shape {tuple(perturbed.shape)}, expected "
                    f"{tuple(weight.shape)}"
                )
                skipped.setdefault(layer, {})[option.label] = reason
                continue
            delta = perturbed.to(weight.device) - weight
            errors[layer][option.label] = float((diagonal * delta.pow(2)).sum())
            if option.label in ratio:
                errors[layer][option.label] += rounding_error(
                    diagonal, perturbed.to(weight.device), ratio[option.label]
                )
    return SensitivityTable(
        metric=metric,
        errors=errors,
        evaluations=evaluations + sweeps,
        seconds=time.perf_counter() - start,
        skipped=skipped,
        prefix_cached=False,
    )


def _input_roundings(
    model: nn.Module, options: Mapping[str, Sequence[Option]]
) -> dict[str, dict[str, InputRounding]]:
    """Per linear layer, the input rounding of each option that rounds its inputs, by label."""
    found: dict[str, dict[str, InputRounding]] = {}
    for layer, layer_options in options.items():
        if LayerShape.of(model.get_submodule(layer)).kind != "linear":
            continue
        for option in layer_options:
            rounding = method_of(option).input_rounding(option)
            if rounding is not None:
                found.setdefault(layer, {})[option.label] = rounding
    return found


# --- rank agreement -------------------------------------------------------------------------


def _rank_correlation(pairs: Sequence[tuple[float, float]]) -> float:
    """Spearman correlation of the pairs, leaving out those exactly 0 on both sides; NaN when
    fewer than two remain or one side is constant."""
    kept = [(a, b) for a, b in pairs if not (a == 0.0 and b == 0.0)]
    if len(kept) < 2:
        return math.nan
    first, second = zip(*kept, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(first, second).statistic)


def spearman(table_a: SensitivityTable, table_b: SensitivityTable) -> float:
    """Spearman rank correlation over the (layer, label) pairs in both tables (pairs that are
    exactly 0 in both, such as keep, are left out)."""
    pairs = [
        (value, table_b.errors[layer][label])
        for layer, row in table_a.errors.items()
        for label, value in row.items()
        if label in table_b.errors.get(layer, {})
    ]
    return _rank_correlation(pairs)


def rank_agreement_by_layer(
    proxy: SensitivityTable, reference: SensitivityTable, label: str
) -> float:
    """Spearman rank correlation over the layers that have option ``label`` in both tables."""
    pairs = [
        (row[label], reference.errors[layer][label])
        for layer, row in proxy.errors.items()
        if label in row and label in reference.errors.get(layer, {})
    ]
    return _rank_correlation(pairs)
