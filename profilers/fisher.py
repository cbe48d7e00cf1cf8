"""The diagonal Fisher (or Gauss-Newton) information of layer weights, by backward passes.

With logits the metric is KL: labels are drawn from the model's own next-token distribution,
so ``E[grad^2]`` of their log-probability is the Fisher diagonal. Otherwise the metric is the
normalised MSE of the outputs, whose Gauss-Newton diagonal is ``E[grad^2]`` of ``v . y`` for
Gaussian ``v``. Used by the Fisher sensitivity proxy and by methods whose observers ask for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import is_conv1d
from profilers.quality import _token_mask, metric_for, select_outputs

Batch = dict[str, torch.Tensor]


def _output_scales(model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    """Per selected output ``1 / sqrt(K * sum y^2)`` (0 for an all-zero output), where the sum
    runs over unmasked tokens of all batches and ``K`` is the number of outputs."""
    norms: dict[str, float] = {}
    with torch.inference_mode():
        for batch in batches:
            for key, y in select_outputs(model(**batch)).items():
                y = y.detach().float()
                keep = _token_mask(y, batch.get("attention_mask"))
                if keep is not None:
                    y = y[keep]
                norms[key] = norms.get(key, 0.0) + float(y.pow(2).sum())
    count = len(norms)
    return {k: 1.0 / math.sqrt(count * n) if n > 0 else 0.0 for k, n in norms.items()}


@contextmanager
def _gradients_for(model: nn.Module, weights: Sequence[torch.Tensor]) -> Iterator[None]:
    """Only ``weights`` require grad inside; every flag is restored on exit."""
    tensors = {id(p): p for p in [*model.parameters(), *weights]}
    flags = {key: p.requires_grad for key, p in tensors.items()}
    try:
        for p in tensors.values():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for key, p in tensors.items():
            p.requires_grad_(flags[key])


def _kl_draws(
    logits: torch.Tensor,
    mask: torch.Tensor | None,
    samples: int,
    generator: torch.Generator,
) -> Iterator[torch.Tensor]:
    """Log-probabilities of labels drawn from the model's own distribution, summed over the
    unmasked tokens: ``E[grad^2]`` is the sum over tokens of the Fisher diagonal."""
    keep = _token_mask(logits, mask)
    selected = logits[keep] if keep is not None else logits.reshape(-1, logits.shape[-1])
    log_probs = F.log_softmax(selected.float(), dim=-1)
    probs = log_probs.detach().exp()
    for _ in range(samples):
        labels = torch.multinomial(probs, 1, generator=generator)
        yield log_probs.gather(-1, labels).sum()


def _nmse_draws(
    outputs: Mapping[str, torch.Tensor],
    mask: torch.Tensor | None,
    scales: Mapping[str, float],
    samples: int,
    generator: torch.Generator,
) -> Iterator[torch.Tensor]:
    """``sum_k scale_k * (v_k . y_k)`` for Gaussian ``v_k``: ``E[grad^2]`` is the Gauss-Newton
    diagonal ``sum_k scale_k^2 diag(J_k^T J_k)`` over the unmasked tokens."""
    selected = {}
    for key, y in outputs.items():
        keep = _token_mask(y, mask)
        selected[key] = (y[keep] if keep is not None else y).float()
    for _ in range(samples):
        total = torch.zeros((), device=next(iter(selected.values())).device)
        for key, y in selected.items():
            v = torch.randn(y.shape, generator=generator, device=y.device)
            total = total + scales[key] * (v * y).sum()
        yield total


def fisher_diagonals(
    model: nn.Module,
    layers: Sequence[str],
    batches: Sequence[Batch],
    samples: int,
    seed: int,
) -> tuple[dict[str, torch.Tensor], str, int]:
    """Per layer the normalised Fisher diagonal (``[out, in]`` for linear layers), the output
    metric, and the sweeps over ``batches`` run (forward and backward)."""
    modules = {layer: model.get_submodule(layer) for layer in layers}
    weights = {layer: module.weight for layer, module in modules.items()}
    unique = list({id(w): w for w in weights.values()}.values())
    sums = {id(w): torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in unique}
    metric = ""
    scales: dict[str, float] = {}
    tokens = forward_sweeps = backward_calls = 0
    generator: torch.Generator | None = None
    with _gradients_for(model, unique):
        for batch in batches:
            outputs = select_outputs(model(**batch))
            if not metric:
                metric = metric_for(outputs)
                forward_sweeps = 1
                if metric == "nmse":
                    scales = _output_scales(model, batches)
                    forward_sweeps += 1
            first = next(iter(outputs.values()))
            if generator is None:
                generator = torch.Generator(device=first.device).manual_seed(seed)
            mask = batch.get("attention_mask")
            if metric == "kl":
                draws = _kl_draws(outputs["logits"], mask, samples, generator)
                keep = _token_mask(first, mask)
                tokens += int(keep.sum()) if keep is not None else first[..., 0].numel()
            else:
                draws = _nmse_draws(outputs, mask, scales, samples, generator)
            for sample, scalar in enumerate(draws):
                if not scalar.requires_grad:
                    break
                grads = torch.autograd.grad(
                    scalar, unique, retain_graph=sample < samples - 1, allow_unused=True
                )
                for w, grad in zip(unique, grads, strict=True):
                    if grad is not None:
                        sums[id(w)].add_(grad.detach().float().pow(2))
                backward_calls += 1
    factor = 1.0 / samples if metric == "nmse" else 0.5 / (samples * max(tokens, 1))
    for total in sums.values():
        total.mul_(factor)
    diagonals = {}
    for layer, module in modules.items():
        diagonal = sums[id(weights[layer])]
        diagonals[layer] = diagonal.t() if is_conv1d(module) else diagonal
    return diagonals, metric, forward_sweeps + -(-backward_calls // len(batches))
