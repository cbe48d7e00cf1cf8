"""Output error of a compressed model against its uncompressed reference.

Models with ``logits`` are compared by the KL divergence of their output distributions
(mean over tokens, reference first); other models by the normalised mean squared error of
each floating output (``sum (y' - y)^2 / sum y^2``, averaged over outputs). Tokens masked
out by ``attention_mask`` are left out of both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from methods.owned_cache import OwnedCache

SKIPPED_OUTPUTS = {"hidden_states", "attentions", "past_key_values", "cross_attentions"}


def select_outputs(output: Any) -> dict[str, torch.Tensor]:
    """The tensors of a model output that quality is judged on."""
    if isinstance(output, torch.Tensor):
        return {"output": output}
    if isinstance(output, Mapping):
        if output.get("logits") is not None:
            return {"logits": output["logits"]}
        items = [(k, v) for k, v in output.items() if k not in SKIPPED_OUTPUTS]
    elif isinstance(output, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(output)]
    else:
        raise TypeError(f"cannot judge a model output of type {type(output).__name__}")
    chosen = {k: v for k, v in items if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if not chosen:
        raise TypeError("the model output holds no floating-point tensor to compare")
    return chosen


def metric_for(outputs: Mapping[str, torch.Tensor]) -> str:
    return "kl" if "logits" in outputs else "nmse"


def _token_mask(tensor: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask applies to per-token outputs only: batch x tokens x features."""
    if mask is None or tensor.dim() < 3 or tuple(tensor.shape[:2]) != tuple(mask.shape):
        return None
    return mask.to(device=tensor.device, dtype=torch.bool)


class OutputError:
    """Accumulates the error of outputs against reference outputs over batches."""

    def __init__(self, metric: str) -> None:
        if metric not in ("kl", "nmse"):
            raise ValueError(f"unknown metric {metric!r}; allowed: kl, nmse")
        self.metric = metric
        self._num: dict[str, float] = {}
        self._den: dict[str, float] = {}

    def add(
        self,
        reference: Mapping[str, torch.Tensor],
        output: Mapping[str, torch.Tensor],
        mask: torch.Tensor | None = None,
    ) -> None:
        for key, given in reference.items():
            ref = given.to(torch.float32)
            out = output[key].to(ref.device, torch.float32)
            keep = _token_mask(ref, mask)
            if keep is not None and bool(keep.all()):
                keep = None  # every token counts: no copy of either tensor
            if keep is not None:
                ref, out = ref[keep], out[keep]
            if self.metric == "kl":
                normalised = REFERENCE_LOG_PROBS.get((given, mask), (), lambda r=ref: _log_probs(r))
                num, den = _kl_sum(normalised, out), float(ref[..., 0].numel())
            else:
                num = float((out - ref).pow(2).sum())
                den = float(ref.pow(2).sum())
            self._num[key] = self._num.get(key, 0.0) + num
            self._den[key] = self._den.get(key, 0.0) + den

    def value(self) -> float:
        if not self._num:
            raise ValueError("no batch was added")
        ratios = [self._num[k] / self._den[k] if self._den[k] > 0 else 0.0 for k in self._num]
        return max(sum(ratios) / len(ratios), 0.0)


KL_CHUNK_ELEMENTS = 1 << 22  # the temporaries of one chunk of rows: 16 MB each in float32


class LogProbs(NamedTuple):
    """A reference's distributions over the vocabulary, one row per token: log-probabilities
    and probabilities, in float32."""

    log_p: torch.Tensor
    p: torch.Tensor


def _log_probs(reference: torch.Tensor) -> LogProbs:
    """``reference``'s logits normalised, a chunk of rows at a time."""
    vocab = reference.shape[-1]
    rows = max(1, KL_CHUNK_ELEMENTS // vocab)
    log_p = torch.cat(
        [F.log_softmax(chunk, dim=-1) for chunk in reference.reshape(-1, vocab).split(rows)]
    )
    return LogProbs(log_p, log_p.exp())


class ReferenceCache(OwnedCache[LogProbs]):
    """The normalised distributions of reference logits, kept per reference tensor (and
    token mask) while the tensor lives, least recently used out first within a byte cap: a
    tune compares one split's reference with the outputs of many plans, and normalising it
    each time cost as much as normalising the outputs."""

    def __init__(self, cap_bytes: int) -> None:
        super().__init__(cap_bytes, lambda found: sum(t.numel() * t.element_size() for t in found))


REFERENCE_LOG_PROBS = ReferenceCache(cap_bytes=512 << 20)


def _kl_sum(reference: LogProbs, output: torch.Tensor) -> float:
    """The summed KL divergence of ``output``'s distributions (logits) from the reference's
    over every row (token), a chunk of rows at a time, so a large vocabulary's temporaries
    stay small."""
    vocab = reference.log_p.shape[-1]
    out = output.reshape(-1, vocab)
    rows = max(1, KL_CHUNK_ELEMENTS // vocab)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, out.shape[0], rows):
        log_p, p = reference.log_p[start : start + rows], reference.p[start : start + rows]
        log_q = F.log_softmax(out[start : start + rows], dim=-1)
        total += (p * (log_p - log_q)).sum(dim=-1).sum(dtype=torch.float64)
    return float(total)


def run_outputs(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[dict]:
    """Selected outputs of ``model`` for each batch, detached on the CPU."""
    results = []
    with torch.inference_mode():
        for batch in batches:
            out = select_outputs(model(**batch))
            results.append({k: v.detach().to("cpu", torch.float32) for k, v in out.items()})
    return results


def output_error(
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    reference: list[dict[str, torch.Tensor]],
    metric: str,
    loss: NextTokenLoss | None = None,
) -> float:
    """Error of ``model`` on ``batches`` against precomputed ``reference`` outputs; with
    ``loss``, the same outputs' next-token loss is added to it too (one pass for both)."""
    acc = OutputError(metric)
    with torch.inference_mode():
        for batch, ref in zip(batches, reference, strict=True):
            out = select_outputs(model(**batch))
            acc.add(ref, out, batch.get("attention_mask"))
            if loss is not None:
                loss.add(out["logits"], batch)
    return acc.value()


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether ``model`` predicts the next token (its logits at position t score token t+1)."""
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or []
    names = [type(model).__name__, *architectures]
    return any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in names) or bool(
        getattr(config, "is_decoder", False)
    )


class NextTokenLoss:
    """Accumulates the next-token cross-entropy of logits over batches (masked tokens and
    the last position, which has no next token, left out)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.tokens = 0

    def add(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        ids = batch["input_ids"].to(logits.device)
        targets = ids[:, 1:]
        scores = logits[:, :-1].float()
        mask = batch.get("attention_mask")
        keep = torch.ones_like(targets, dtype=torch.bool)
        if mask is not None:
            mask = mask.to(logits.device, torch.bool)
            keep = mask[:, 1:] & mask[:, :-1]
        loss = F.cross_entropy(scores[keep], targets[keep], reduction="sum")
        self.total += float(loss)
        self.tokens += int(keep.sum())

    def perplexity(self) -> float:
        if self.tokens == 0:
            raise ValueError("no token to score: every window is a single token")
        return float(torch.exp(torch.tensor(self.total / self.tokens, dtype=torch.float64)))


def perplexity(
    model: torch.nn.Module | None,
    batches: list[dict[str, torch.Tensor]],
    logits: list[Mapping[str, torch.Tensor]] | None = None,
) -> float:
    """Next-token perplexity of a causal LM on ``batches``, from its forward passes or from
    recorded outputs ``logits`` (e.g. the reference outputs of the uncompressed model)."""
    loss = NextTokenLoss()
    with torch.inference_mode():
        for index, batch in enumerate(batches):
            if logits is not None:
                out = logits[index]["logits"]
            else:
                assert model is not None
                out = select_outputs(model(**batch))["logits"]
            loss.add(out, batch)
    return loss.perplexity()
