"""Output selection and output error (NMSE / KL) of profilers.quality."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from profiler_helpers import HIDDEN, Batch, make_batch, tiny_bert_config
from transformers.modeling_outputs import CausalLMOutputWithPast

from profilers.quality import OutputError, metric_for, output_error, run_outputs, select_outputs

Outputs = dict[str, torch.Tensor]


def error_of(
    metric: str, *pairs: tuple[Outputs, Outputs], mask: torch.Tensor | None = None
) -> float:
    acc = OutputError(metric)
    for reference, output in pairs:
        acc.add(reference, output, mask)
    return acc.value()


def kl_per_row(reference: torch.Tensor, output: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(output)), by torch's kl_div."""
    log_p = F.log_softmax(reference.double(), dim=-1)
    log_q = F.log_softmax(output.double(), dim=-1)
    rows = reference.numel() // reference.shape[-1]
    return float(F.kl_div(log_q, log_p, log_target=True, reduction="sum")) / rows


def perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


# --- select_outputs ------------------------------------------------------------------------


def test_select_outputs_prefers_logits() -> None:
    logits = torch.randn(2, 3, 5)
    output = CausalLMOutputWithPast(logits=logits, hidden_states=(torch.randn(2, 3, 4),))
    selected = select_outputs(output)
    assert list(selected) == ["logits"]
    assert selected["logits"] is logits


def test_select_outputs_prefers_logits_in_a_plain_dict() -> None:
    logits = torch.randn(2, 5)
    selected = select_outputs({"last_hidden_state": torch.randn(2, 3, 4), "logits": logits})
    assert list(selected) == ["logits"]
    assert selected["logits"] is logits


def test_select_outputs_without_logits_takes_floating_tensors_but_skipped_keys() -> None:
    hidden, pooled = torch.randn(2, 3, 4), torch.randn(2, 4)
    output = {
        "last_hidden_state": hidden,
        "pooler_output": pooled,
        "logits": None,
        "hidden_states": torch.randn(2, 3, 4),
        "attentions": (torch.randn(2, 1, 3, 3),),
        "past_key_values": torch.randn(2, 3),
        "cross_attentions": torch.randn(2, 3),
        "token_ids": torch.zeros(2, 3, dtype=torch.long),
        "flags": torch.zeros(2, dtype=torch.bool),
    }
    selected = select_outputs(output)
    assert set(selected) == {"last_hidden_state", "pooler_output"}
    assert selected["last_hidden_state"] is hidden
    assert selected["pooler_output"] is pooled


def test_select_outputs_of_a_real_encoder_output(bert: torch.nn.Module) -> None:
    batch = make_batch(2, 5)
    with torch.inference_mode():
        output = bert(**batch, output_hidden_states=True)
    assert isinstance(output.hidden_states, tuple)
    selected = select_outputs(output)
    assert set(selected) == {"last_hidden_state", "pooler_output"}
    assert torch.equal(selected["last_hidden_state"], output.last_hidden_state)


@pytest.mark.parametrize("container", [tuple, list])
def test_select_outputs_of_a_sequence_keys_floating_items_by_position(container: type) -> None:
    first, last = torch.randn(2, 3), torch.randn(2, 3).half()
    output = container([first, torch.arange(3), (torch.randn(2),), None, last])
    selected = select_outputs(output)
    assert list(selected) == ["0", "4"]
    assert selected["0"] is first
    assert selected["4"] is last


def test_select_outputs_of_a_namedtuple() -> None:
    Pair = namedtuple("Pair", ["hidden", "ids"])
    hidden = torch.randn(2, 3)
    assert select_outputs(Pair(hidden, torch.arange(2))) == {"0": hidden}


def test_select_outputs_of_a_plain_tensor() -> None:
    tensor = torch.randn(2, 3)
    selected = select_outputs(tensor)
    assert list(selected) == ["output"]
    assert selected["output"] is tensor


@pytest.mark.parametrize(
    "output",
    [
        {"token_ids": torch.zeros(2, 3, dtype=torch.long)},
        {"hidden_states": torch.randn(2, 3), "attentions": torch.randn(2, 3)},
        (torch.arange(3), None),
        [],
        "a string",
        3.0,
    ],
    ids=["int-dict", "only-skipped-keys", "int-tuple", "empty-list", "string", "float"],
)
def test_select_outputs_without_a_floating_tensor_raises_type_error(output: object) -> None:
    with pytest.raises(TypeError):
        select_outputs(output)


# --- metric_for ----------------------------------------------------------------------------


def test_metric_for() -> None:
    assert metric_for({"logits": torch.zeros(1)}) == "kl"
    assert metric_for({"last_hidden_state": torch.zeros(1)}) == "nmse"
    assert metric_for({"output": torch.zeros(1)}) == "nmse"
    assert metric_for(select_outputs((torch.zeros(1),))) == "nmse"


# --- OutputError: NMSE ---------------------------------------------------------------------


def test_nmse_of_one_output_by_hand() -> None:
    reference = {"y": torch.tensor([[3.0, 4.0]])}
    output = {"y": torch.tensor([[3.0, 5.0]])}
    # (5 - 4)^2 / (3^2 + 4^2)
    assert error_of("nmse", (reference, output)) == pytest.approx(1 / 25)


def test_nmse_averages_over_outputs() -> None:
    reference = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([2.0, 0.0])}
    output = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([3.0, 0.0])}
    # a: 1 / 1, b: 1 / 4
    assert error_of("nmse", (reference, output)) == pytest.approx((1.0 + 0.25) / 2)


def test_nmse_pools_sums_over_batches_rather_than_averaging_ratios() -> None:
    first = ({"y": torch.tensor([1.0, 0.0])}, {"y": torch.tensor([2.0, 0.0])})
    second = ({"y": torch.tensor([0.0, 3.0])}, {"y": torch.tensor([0.0, 3.0])})
    # (1 + 0) / (1 + 9), not (1/1 + 0/9) / 2
    assert error_of("nmse", first, second) == pytest.approx(1 / 10)


def test_nmse_compares_in_float32_whatever_the_output_dtype() -> None:
    reference = {"y": torch.tensor([[2.0, 0.0]], dtype=torch.float16)}
    output = {"y": torch.tensor([[2.0, 1.0]], dtype=torch.bfloat16)}
    assert error_of("nmse", (reference, output)) == pytest.approx(1 / 4)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-2, 1e2),
)
def test_nmse_is_scale_invariant_and_zero_only_for_equal_outputs(seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randn(2, 3, 4, generator=generator)
    output = reference + 0.1 * torch.randn(2, 3, 4, generator=generator)
    base = error_of("nmse", ({"y": reference}, {"y": output}))
    scaled = error_of("nmse", ({"y": scale * reference}, {"y": scale * output}))
    assert base > 0
    assert scaled == pytest.approx(base, rel=1e-4)
    assert error_of("nmse", ({"y": reference}, {"y": reference.clone()})) == 0.0


# --- OutputError: KL -----------------------------------------------------------------------


def test_kl_of_identical_logits_is_zero() -> None:
    logits = torch.randn(2, 5, 11)
    assert error_of("kl", ({"logits": logits}, {"logits": logits.clone()})) == 0.0


def test_kl_matches_torch_kl_div_with_the_reference_first() -> None:
    generator = torch.Generator().manual_seed(3)
    reference = 2 * torch.randn(2, 5, 11, generator=generator)
    output = 2 * torch.randn(2, 5, 11, generator=generator)
    value = error_of("kl", ({"logits": reference}, {"logits": output}))
    forward, backward = kl_per_row(reference, output), kl_per_row(output, reference)
    assert value == pytest.approx(forward, rel=1e-5)
    assert abs(forward - backward) > 1e-3 * forward  # the direction is really checked


def test_kl_of_two_classes_by_hand() -> None:
    # p = (1/2, 1/2), q = (1/(1+e), e/(1+e)): KL(p||q) = -log 2 - (log q1 + log q2) / 2
    reference = {"logits": torch.tensor([[0.0, 0.0]])}
    output = {"logits": torch.tensor([[0.0, 1.0]])}
    e = torch.e
    expected = -torch.log(torch.tensor(2.0)) - 0.5 * (
        torch.log(torch.tensor(1 / (1 + e))) + torch.log(torch.tensor(e / (1 + e)))
    )
    assert error_of("kl", (reference, output)) == pytest.approx(float(expected), rel=1e-5)


def test_kl_is_a_mean_over_tokens_of_all_batches() -> None:
    generator = torch.Generator().manual_seed(4)
    ref_a, out_a = (
        torch.randn(1, 2, 7, generator=generator),
        torch.randn(1, 2, 7, generator=generator),
    )
    ref_b, out_b = (
        torch.randn(3, 4, 7, generator=generator),
        torch.randn(3, 4, 7, generator=generator),
    )
    value = error_of(
        "kl", ({"logits": ref_a}, {"logits": out_a}), ({"logits": ref_b}, {"logits": out_b})
    )
    tokens_a, tokens_b = 2, 12
    expected = (kl_per_row(ref_a, out_a) * tokens_a + kl_per_row(ref_b, out_b) * tokens_b) / (
        tokens_a + tokens_b
    )
    assert value == pytest.approx(expected, rel=1e-5)


def test_kl_against_one_reference_and_many_outputs_is_each_pairs_own_kl() -> None:
    """The reference's normalised distributions are kept between calls: every output is still
    compared with its own reference, and changing the mask changes which tokens count."""
    generator = torch.Generator().manual_seed(8)
    reference = 3 * torch.randn(2, 4, 9, generator=generator)
    outputs = [3 * torch.randn(2, 4, 9, generator=generator) for _ in range(3)]
    for output in outputs:
        value = error_of("kl", ({"logits": reference}, {"logits": output}))
        assert value == pytest.approx(kl_per_row(reference, output), rel=1e-5)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    masked = error_of("kl", ({"logits": reference}, {"logits": outputs[0]}), mask=mask)
    keep = mask.bool()
    assert masked == pytest.approx(kl_per_row(reference[keep], outputs[0][keep]), rel=1e-5)


def test_the_reference_cache_keeps_within_its_cap_and_forgets_a_freed_reference() -> None:
    from profilers.quality import LogProbs, ReferenceCache

    cache = ReferenceCache(cap_bytes=3 * 2 * 4 * 10)  # three references of 10 floats each
    made = []

    def make(tensor: torch.Tensor):
        def compute() -> LogProbs:
            made.append(tensor)
            return LogProbs(torch.log_softmax(tensor, -1), torch.softmax(tensor, -1))

        return compute

    kept = [torch.randn(2, 5) for _ in range(4)]
    for tensor in kept:
        cache.get((tensor, None), (), make(tensor))
    assert len(cache.entries) == 3 and cache.used == 3 * 2 * 4 * 10  # the first went out
    cache.get((kept[3], None), (), make(kept[3]))
    assert len(made) == 4  # kept: not normalised again
    cache.get((kept[0], None), (), make(kept[0]))
    assert len(made) == 5  # dropped for room: normalised again
    del made[:], kept[1:], tensor
    assert len(cache.entries) == 1 and cache.used == 2 * 4 * 10
    too_big = torch.randn(4, 10)
    cache.get((too_big, None), (), make(too_big))
    assert len(cache.entries) == 1  # larger than the cap: computed, not kept


# --- OutputError: attention mask -----------------------------------------------------------


@pytest.mark.parametrize("metric", ["kl", "nmse"])
def test_masked_tokens_do_not_count(metric: str) -> None:
    generator = torch.Generator().manual_seed(5)
    reference = torch.randn(2, 4, 6, generator=generator)
    output = reference + 0.3 * torch.randn(2, 4, 6, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    key = "logits" if metric == "kl" else "y"
    base = error_of(metric, ({key: reference}, {key: output}), mask=mask)

    changed_masked = output.clone()
    changed_masked[0, 3] += 100.0
    changed_masked[1, 2:] = -50.0
    assert error_of(metric, ({key: reference}, {key: changed_masked}), mask=mask) == base

    changed_kept = output.clone()
    changed_kept[1, 1] += 1.0
    assert error_of(metric, ({key: reference}, {key: changed_kept}), mask=mask) != base

    keep = mask.bool()
    only_kept = error_of(metric, ({key: reference[keep]}, {key: output[keep]}))
    assert base == pytest.approx(only_kept, rel=1e-6)


@pytest.mark.parametrize("metric", ["kl", "nmse"])
def test_a_mask_of_ones_changes_nothing(metric: str) -> None:
    generator = torch.Generator().manual_seed(6)
    reference, output = (
        torch.randn(2, 3, 5, generator=generator),
        torch.randn(2, 3, 5, generator=generator),
    )
    pair = ({"logits": reference}, {"logits": output})
    ones = torch.ones(2, 3, dtype=torch.long)
    assert error_of(metric, pair, mask=ones) == pytest.approx(error_of(metric, pair), rel=1e-6)


def test_mask_is_not_applied_to_outputs_that_are_not_per_token() -> None:
    # pooled output [batch, hidden] with hidden != sequence length: every value counts
    reference = {"pooler_output": torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 4.0]])}
    output = {"pooler_output": torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]])}
    mask = torch.tensor([[1, 0], [1, 1]])
    assert error_of("nmse", (reference, output), mask=mask) == pytest.approx(1 / 25)


def test_kl_of_per_sample_logits_ignores_the_mask_when_labels_equal_sequence_length() -> None:
    generator = torch.Generator().manual_seed(8)
    reference = torch.randn(2, 4, generator=generator)  # 2 samples, 4 classes
    output = torch.randn(2, 4, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # 4 tokens per sample
    value = error_of("kl", ({"logits": reference}, {"logits": output}), mask=mask)
    assert value == pytest.approx(kl_per_row(reference, output), rel=1e-5)


# --- OutputError: errors -------------------------------------------------------------------


def test_unknown_metric_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        OutputError("mse")


def test_value_without_batches_is_an_error() -> None:
    with pytest.raises(ValueError, match="no batch"):
        OutputError("nmse").value()


# --- run_outputs / output_error on tiny models ---------------------------------------------


def pooled_nmse(
    references: list[Outputs], outputs: list[Outputs], batches: list[Batch], key: str, masked: bool
) -> float:
    num = den = 0.0
    for reference, output, batch in zip(references, outputs, batches, strict=True):
        ref, out = reference[key], output[key]
        if masked:
            keep = batch["attention_mask"].bool()
            ref, out = ref[keep], out[keep]
        num += float((out - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return num / den


def test_run_outputs_selects_detached_float32_cpu_outputs(
    bert: torch.nn.Module, batches: list[Batch]
) -> None:
    results = run_outputs(bert, batches)
    assert len(results) == len(batches)
    for result, batch in zip(results, batches, strict=True):
        assert set(result) == {"last_hidden_state", "pooler_output"}
        for tensor in result.values():
            assert tensor.dtype == torch.float32
            assert tensor.device.type == "cpu"
            assert not tensor.requires_grad
        with torch.no_grad():
            direct = bert(**batch)
        assert torch.equal(result["last_hidden_state"], direct.last_hidden_state)


def test_output_error_of_a_model_against_itself_is_zero(
    bert: torch.nn.Module, gpt2: torch.nn.Module, batches: list[Batch]
) -> None:
    bert_reference = run_outputs(bert, batches)
    assert output_error(bert, batches, bert_reference, metric_for(bert_reference[0])) == 0.0
    gpt2_reference = run_outputs(gpt2, batches)
    assert list(gpt2_reference[0]) == ["logits"]
    assert metric_for(gpt2_reference[0]) == "kl"
    assert output_error(gpt2, batches, gpt2_reference, "kl") == 0.0


def test_output_error_of_a_changed_encoder_by_hand(
    bert: torch.nn.Module, batches: list[Batch]
) -> None:
    reference = run_outputs(bert, batches)
    perturb_(bert.encoder.layer[1].output.dense)
    changed = run_outputs(bert, batches)
    expected = 0.5 * (
        pooled_nmse(reference, changed, batches, "last_hidden_state", masked=True)
        + pooled_nmse(reference, changed, batches, "pooler_output", masked=False)
    )
    value = output_error(bert, batches, reference, "nmse")
    assert value > 0
    assert value == pytest.approx(expected, rel=1e-5)


def test_output_error_of_a_changed_causal_lm_by_hand(
    gpt2: torch.nn.Module, batches: list[Batch]
) -> None:
    reference = run_outputs(gpt2, batches)
    perturb_(gpt2.transformer.h[0].mlp)
    changed = run_outputs(gpt2, batches)
    total = tokens = 0.0
    for ref, out, batch in zip(reference, changed, batches, strict=True):
        keep = batch["attention_mask"].bool()
        count = int(keep.sum())
        total += kl_per_row(ref["logits"][keep], out["logits"][keep]) * count
        tokens += count
    value = output_error(gpt2, batches, reference, "kl")
    assert value > 0
    assert value == pytest.approx(total / tokens, rel=1e-4)


def test_output_error_needs_one_reference_per_batch(
    bert: torch.nn.Module, batches: list[Batch]
) -> None:
    reference = run_outputs(bert, batches)
    with pytest.raises(ValueError):
        output_error(bert, batches, reference[:1], "nmse")


def test_output_error_counts_all_pooled_features_when_sequence_length_equals_hidden(
    bert: torch.nn.Module,
) -> None:
    batches = [make_batch(2, HIDDEN, padded=12, seed=3)]
    reference = run_outputs(bert, batches)
    perturb_(bert.pooler.dense)
    changed = run_outputs(bert, batches)
    expected = 0.5 * (
        pooled_nmse(reference, changed, batches, "last_hidden_state", masked=True)
        + pooled_nmse(reference, changed, batches, "pooler_output", masked=False)
    )
    assert output_error(bert, batches, reference, "nmse") == pytest.approx(expected, rel=1e-5)


def test_output_error_of_a_classifier_compares_per_sample_distributions() -> None:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(tiny_bert_config(num_labels=5)).eval()
    batches = [make_batch(2, 8, padded=3, seed=4), make_batch(3, 6, padded=1, seed=5)]
    reference = run_outputs(model, batches)
    assert list(reference[0]) == ["logits"]
    perturb_(model.classifier, scale=0.5)
    changed = run_outputs(model, batches)
    samples = sum(len(ref["logits"]) for ref in reference)
    expected = sum(
        kl_per_row(ref["logits"], out["logits"]) * len(ref["logits"])
        for ref, out in zip(reference, changed, strict=True)
    )
    value = output_error(model, batches, reference, "kl")
    assert value > 0
    assert value == pytest.approx(expected / samples, rel=1e-4)


def _tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    return transformers.GPT2LMHeadModel(config).eval()


def test_perplexity_is_the_exponent_of_the_mean_next_token_loss() -> None:
    from profilers.quality import is_causal_lm, perplexity, run_outputs

    model = _tiny_gpt2()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding: the last three tokens of the second row are not scored
    batches = [{"input_ids": ids, "attention_mask": mask}]
    with torch.no_grad():
        logits = model(**batches[0]).logits
    losses = [
        F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"),
        F.cross_entropy(logits[1, :5], ids[1, 1:6], reduction="sum"),
    ]
    expected = float(torch.exp(sum(losses) / (8 + 5)))
    assert perplexity(model, batches) == pytest.approx(expected, rel=1e-5)
    recorded = run_outputs(model, batches)
    assert perplexity(None, batches, logits=recorded) == pytest.approx(expected, rel=1e-5)
    assert is_causal_lm(model)
    assert not is_causal_lm(transformers.BertModel(tiny_bert_config()))


def test_output_error_with_a_loss_gives_the_perplexity_of_the_same_pass() -> None:
    from profilers.quality import NextTokenLoss, perplexity

    model = _tiny_gpt2()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    reference = run_outputs(model, batches)
    perturb_(model.lm_head, scale=0.2)
    loss = NextTokenLoss()
    error = output_error(model, batches, reference, "kl", loss)
    assert error == output_error(model, batches, reference, "kl")
    assert loss.perplexity() == pytest.approx(perplexity(model, batches), rel=1e-6)
    assert loss.perplexity() != pytest.approx(perplexity(None, batches, logits=reference))
