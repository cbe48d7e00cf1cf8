"""The GGUF export: the file size priced before the file exists is the written file's, to the
byte; llama.cpp loads the file and computes what autotune's modules compute; what llama.cpp
or the format cannot take is refused in one line and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autotune.apply import apply_plan
from autotune.export import ExportError, export_plan
from autotune.export.gguf import gguf_byte_prices, gguf_stored_bytes
from autotune.layers import compressible_layers
from autotune.plan import Plan
from methods import ggml_quantizer
from methods.keep import KeepOption
from methods.tied import untie_output_embeddings

needs_llama = pytest.mark.skipif(
    not ggml_quantizer.available(), reason="llama.cpp (llama-cpp-python) is not installed"
)


def gguf(type_: str, imatrix: bool = False) -> dict:
    return {"method": "gguf", "type": type_, "imatrix": imatrix}


def make_model(family: str = "llama", tied: bool = False, seed: int = 0, vocab_size: int = 4096):
    """A small random model of ``family`` as wide as K-quants need (256), 4096 tokens."""
    import transformers

    torch.manual_seed(seed)
    if family == "gpt2":  # Conv1D layers stored [in, out], one fused query/key/value layer
        config = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_embd=256,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=tied,
        )
        return transformers.GPT2LMHeadModel(config).eval()
    common = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    if family == "qwen2":
        config = transformers.Qwen2Config(**common)  # biases on q, k and v
        return transformers.Qwen2ForCausalLM(config).eval()
    if family == "qwen3":  # heads wider than hidden / heads, with query and key norms
        config = transformers.Qwen3Config(**common, head_dim=128)
        return transformers.Qwen3ForCausalLM(config).eval()
    if family == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()


def tune_for_llama_cpp(budget: int | str, tokenizer, family: str = "llama", **overrides):
    """A quick tune of :func:`make_model` for llama.cpp (allocator, few short windows);
    ``budget`` in bytes or a budget's text, ``overrides`` replace or add settings."""
    from autotune.tuner import autotune

    settings = dict(
        runtime="llama.cpp",
        progress=False,
        search="allocator",
        seq_len=32,
        calibration_windows=16,
        sensitivity_windows=2,
        selection_windows=4,
        heldout_windows=4,
    )
    text = f"{budget}B" if isinstance(budget, int) else budget
    model = make_model(family, tied=family == "gpt2")
    return autotune(model, text, "cpu", tokenizer=tokenizer, **{**settings, **overrides})


PLANS = {
    "float": Plan(layers={"_default": {"method": "none"}}),
    "legacy types": Plan(
        layers={
            "_default": gguf("Q8_0"),
            r"re:.*mlp\..*": gguf("Q4_1"),
            "model.embed_tokens": gguf("Q5_0"),
        }
    ),
    "k-quants": Plan(
        layers={
            "_default": gguf("Q4_K"),
            r"re:.*v_proj": gguf("Q6_K"),
            r"re:.*down_proj": gguf("Q3_K"),
            "model.layers.1.mlp.up_proj": gguf("IQ4_XS"),
            "model.layers.0.self_attn.o_proj": {"method": "none"},
            "model.embed_tokens": gguf("Q2_K"),
        }
    ),
}
KEEP = {"method": "none"}
GPT2_PLANS = {  # the same plans in GPT-2's layer names; llama.cpp keeps positions in float
    "legacy types": Plan(
        layers={
            "_default": gguf("Q8_0"),
            "transformer.wpe": KEEP,
            r"re:.*mlp\..*": gguf("Q4_1"),
            "transformer.wte": gguf("Q5_0"),
        }
    ),
    "k-quants": Plan(
        layers={
            "_default": gguf("Q4_K"),
            "transformer.wpe": KEEP,
            r"re:.*c_attn": gguf("Q6_K"),
            r"re:.*mlp\.c_proj": gguf("Q3_K"),
            "transformer.h.1.mlp.c_fc": gguf("IQ4_XS"),
            "transformer.h.0.attn.c_proj": KEEP,
            "transformer.wte": gguf("Q2_K"),
        }
    ),
}


def plan_for(family: str, plan_name: str) -> Plan:
    return (
        GPT2_PLANS[plan_name] if family == "gpt2" and plan_name in GPT2_PLANS else PLANS[plan_name]
    )


CASES = [
    ("llama", False, "float"),
    ("llama", False, "legacy types"),
    ("llama", False, "k-quants"),
    ("llama", True, "legacy types"),
    ("qwen2", False, "legacy types"),
    ("qwen3", True, "k-quants"),
    ("mistral", False, "legacy types"),
    ("gpt2", True, "float"),
    ("gpt2", True, "legacy types"),
    ("gpt2", False, "k-quants"),
]


def test_every_family_is_exported_and_run_in_these_tests() -> None:
    from autotune.export.gguf_families import FAMILIES

    assert {family for family, _, _ in CASES} == set(FAMILIES)


def compress(model, plan: Plan):
    return apply_plan(model, plan)


@pytest.mark.parametrize(("family", "tied", "plan_name"), CASES)
def test_priced_bytes_are_the_written_files_bytes(
    family: str, tied: bool, plan_name: str, bpe_tokenizer, tmp_path: Path
) -> None:
    if plan_name == "k-quants" and not ggml_quantizer.available():
        pytest.skip("K-quants need llama.cpp's quantizer")
    model = make_model(family, tied)
    plan = plan_for(family, plan_name)
    work = make_model(family, tied)
    untie_output_embeddings(work)  # as a tune does: a tied table is one layer
    layers = compressible_layers(work, min_numel=0)
    chosen = plan.resolve([ref.name for ref in layers], strict=False)
    options = {ref.name: [KeepOption(), chosen[ref.name]] for ref in layers}
    prices = gguf_byte_prices(work, layers, options, bpe_tokenizer)
    predicted = prices.fixed + sum(
        prices.per_layer[ref.name][0 if chosen[ref.name].method == "none" else 1] for ref in layers
    )
    result = export_plan(plan, model, "gguf", tmp_path / "m.gguf", tokenizer=bpe_tokenizer)
    assert result.bytes == (tmp_path / "m.gguf").stat().st_size == predicted
    stored = gguf_stored_bytes(compress(model, plan), plan, bpe_tokenizer)
    assert stored["bytes"] == predicted
    if plan_name == "float":
        assert prices.original == predicted


def logits_in_llama_cpp(path: Path, ids: list[int]) -> torch.Tensor:
    from autotune.export.llama_cpp import LlamaCppModel

    model = LlamaCppModel(path, n_ctx=64)
    try:
        return model(input_ids=torch.tensor([ids]))["logits"][0]
    finally:
        model.close()


def kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    p, q = torch.log_softmax(reference.double(), -1), torch.log_softmax(other.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@needs_llama
@pytest.mark.parametrize(
    ("family", "tied", "plan_name"),
    [
        ("llama", False, "float"),
        ("llama", False, "k-quants"),
        ("llama", True, "legacy types"),
        ("qwen2", False, "legacy types"),
        ("qwen3", True, "k-quants"),
        ("mistral", False, "k-quants"),
        ("gpt2", True, "float"),
        ("gpt2", True, "legacy types"),
        ("gpt2", False, "k-quants"),
    ],
)
def test_llama_cpp_computes_what_autotunes_modules_compute(
    family: str, tied: bool, plan_name: str, bpe_tokenizer, tmp_path: Path
) -> None:
    """The same weights: llama.cpp's logits match the torch modules' (its dot products
    quantise activations to 8 bits, so not to the last bit), far closer than the
    compression error itself."""
    model = make_model(family, tied)
    plan = plan_for(family, plan_name)
    export_plan(plan, model, "gguf", tmp_path / "m.gguf", tokenizer=bpe_tokenizer)
    compressed = compress(model, plan)
    ids = list(range(5, 45))
    with torch.no_grad():
        ours = compressed(input_ids=torch.tensor([ids])).logits[0]
        original = model(input_ids=torch.tensor([ids])).logits[0]
    theirs = logits_in_llama_cpp(tmp_path / "m.gguf", ids)
    if plan_name == "float":
        assert torch.allclose(theirs, ours, atol=1e-3)
    else:
        assert kl(ours, theirs) < 0.1 * kl(original, ours)


@needs_llama
def test_the_modules_error_is_llama_cpps_error_activations_included(
    monkeypatch, tmp_path: Path
) -> None:
    """On the trained tiny-lm at Q8_0, llama.cpp's 8-bit activations are most of a file's
    error: the modules, which round activations as llama.cpp does, have the error llama.cpp
    has; the same weights with float activations would show well under half of it. (Logits
    are compared by their error, not pointwise: after the first code that rounds the other
    way, later roundings in the two runtimes are independent.)"""
    from autotune.calibration import stdlib_texts
    from autotune.loading import load_model
    from methods.gguf import GGUFLinear

    loaded = load_model("tiny-lm")
    model, tokenizer = loaded.model, loaded.tokenizer
    text = " ".join(list(stdlib_texts("heldout"))[:20])
    ids = tokenizer(text)["input_ids"][:60]
    plan = Plan(layers={"_default": gguf("Q8_0")})
    export_plan(plan, model, "gguf", tmp_path / "m.gguf", tokenizer=tokenizer)
    compressed = compress(model, plan)
    theirs = logits_in_llama_cpp(tmp_path / "m.gguf", ids)
    with torch.no_grad():
        original = model(input_ids=torch.tensor([ids])).logits[0]
        ours = kl(original, compressed(input_ids=torch.tensor([ids])).logits[0])
        monkeypatch.setattr(
            GGUFLinear, "matmul", lambda self, x2: x2 @ self.forward_weight(x2.dtype).T
        )
        float_inputs = kl(original, compressed(input_ids=torch.tensor([ids])).logits[0])
    in_llama_cpp = kl(original, theirs)
    assert ours == pytest.approx(in_llama_cpp, rel=0.15)
    assert float_inputs < 0.5 * in_llama_cpp


def test_an_option_without_a_llama_cpp_type_is_refused_before_writing(tmp_path: Path) -> None:
    plan = Plan(layers={"_default": {"method": "rtn", "bits": 4, "group_size": 32}})
    with pytest.raises(ExportError, match=r"no llama.cpp tensor type; allowed: method gguf"):
        export_plan(plan, make_model(), "gguf", tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_family_llama_cpp_is_not_written_for_is_refused(tmp_path: Path) -> None:
    from tests.conftest import make_tiny_bert

    with pytest.raises(ExportError, match="writes gpt2, llama, mistral, qwen2, qwen3 models"):
        export_plan(PLANS["float"], make_tiny_bert(), "gguf", tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_quantised_position_table_is_refused_before_writing(tmp_path: Path) -> None:
    """llama-quantize never quantises position embeddings, so no plan for llama.cpp does."""
    plan = Plan(layers={"_default": gguf("Q8_0")})
    with pytest.raises(ExportError, match=r"'transformer.wpe'.*keeps position embeddings"):
        export_plan(plan, make_model("gpt2"), "gguf", tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_gpt2_that_llama_cpp_computes_differently_is_refused(tmp_path: Path) -> None:
    model = make_model("gpt2")
    model.config.activation_function = "relu"
    with pytest.raises(ExportError, match=r"tanh GELU .* activation_function is 'relu'"):
        export_plan(PLANS["float"], model, "gguf", tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_the_plans_export_section_names_each_tensors_type_in_the_file(
    bpe_tokenizer, tmp_path: Path
) -> None:
    """``describe`` (the plan's ``export`` section) agrees with the types the written file
    holds, read back with gguf's reader, and its llama-quantize line sets each of them."""
    import gguf as gguf_package

    from autotune.export.gguf import describe

    plan = PLANS["legacy types"]
    model = make_model()
    export_plan(plan, model, "gguf", tmp_path / "m.gguf", tokenizer=bpe_tokenizer)
    described = describe(compress(model, plan), list(plan.options().values()))
    in_file = {
        t.name: t.tensor_type.name
        for t in gguf_package.GGUFReader(tmp_path / "m.gguf").tensors
        if len(t.shape) == 2
    }
    assert described["tensor_types"] == in_file
    command = described["llama_quantize"]
    assert "--token-embedding-type q5_0" in command and "--imatrix" not in command
    assert command.count("--tensor-type") == len(in_file) - 2  # token_embd, output
