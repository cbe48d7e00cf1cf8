"""Tests of methods/tied.py: a tied output layer reads its embedding's (compressed) table."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from methods import kernels, workspace
from methods.base import LayerShape, Option
from methods.quantized import QuantizedEmbedding
from methods.registry import get_method, registered_methods
from methods.rtn import QuantOption
from methods.tied import TiedHead, tied_heads, untie_output_embeddings
from tests.conftest import make_tiny_llama

VOCAB, WIDTH = 300, 64
INT8_PER_ROW = QuantOption(8, None, True)


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_tied_llama() -> transformers.LlamaForCausalLM:
    return make_tiny_llama(vocab_size=512)


class TiedLM(nn.Module):
    """An embedding and an output layer sharing its weight (with a bias of its own)."""

    def __init__(self, vocab: int = VOCAB, width: int = WIDTH, conv1d: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        if conv1d:  # x @ table: maps a vocab-wide input to the embedding width
            self.head = transformers.pytorch_utils.Conv1D(width, vocab)
        else:
            self.head = nn.Linear(width, vocab)
        with torch.no_grad():
            self.embed.weight.normal_(0.0, 0.02)
            self.head.bias.normal_(0.0, 0.02)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual.double() - reference.double()).norm() / reference.double().norm())


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def embedding_options() -> list:
    shape = LayerShape("embedding", VOCAB, WIDTH)
    return [
        pytest.param(option, id=f"{name}-{option.label}")
        for name, method in sorted(registered_methods().items())
        if method.supports(shape)
        for option in method.grid(shape)
    ]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the kernels called from now on."""
    called: list[str] = []
    for name in ("int8_matmul", "int4_matmul"):
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *args, _n=name, _f=real: called.append(_n) or _f(*args)
        )
    return called


# --- untying -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "head", "embedding"),
    [(tiny_gpt2, "lm_head", "transformer.wte"), (tiny_tied_llama, "lm_head", "model.embed_tokens")],
)
def test_untying_keeps_outputs_bit_identical_and_holds_no_copy(build, head, embedding) -> None:
    model = build()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    expected = logits(model, ids)
    parameters = sum(p.numel() for p in model.parameters())
    assert untie_output_embeddings(model) == {head: embedding}
    tied = model.get_submodule(head)
    assert isinstance(tied, TiedHead)
    assert tied.table is model.get_submodule(embedding)
    assert torch.equal(logits(model, ids), expected)
    assert f"{head}.weight" not in model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == parameters
    # a second call finds the head already untied and changes nothing
    assert untie_output_embeddings(model) == {head: embedding}
    assert model.get_submodule(head) is tied
    assert tied_heads(model) == {embedding: [tied]}


def test_a_model_without_tied_layers_is_left_alone() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
    assert untie_output_embeddings(model) == {}
    assert isinstance(model[1], nn.Linear)


def test_the_head_keeps_its_bias_as_its_own_parameter() -> None:
    model = TiedLM()
    bias = model.head.bias
    x = torch.randn(3, WIDTH)
    expected = model(x)
    untie_output_embeddings(model)
    assert model.head.bias is bias
    assert set(model.state_dict()) == {"embed.weight", "head.bias"}
    assert torch.equal(model(x), expected)


def test_a_deep_copy_reads_the_copied_table() -> None:
    model = tiny_gpt2()
    untie_output_embeddings(model)
    copied = copy.deepcopy(model)
    assert copied.lm_head.table is copied.transformer.wte
    assert copied.lm_head.table is not model.transformer.wte
    # compressing the copy's table changes the copy's head, not the original's
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(2))
    before = logits(model, ids)
    table = get_method("rtn").convert(copied.transformer.wte, QuantOption(4, 32, False))
    copied.transformer.wte = table
    assert copied.lm_head.table is table
    assert not torch.equal(logits(copied, ids), before)
    assert torch.equal(logits(model, ids), before)


def test_a_dtype_cast_moves_the_bias_and_the_head_follows_the_table() -> None:
    model = TiedLM()
    untie_output_embeddings(model)
    model.to(torch.float64)
    assert model.head.bias.dtype == torch.float64
    x = torch.randn(3, WIDTH, dtype=torch.float64)
    assert model(x).dtype == torch.float64
    expected = F.linear(x, model.embed.weight, model.head.bias)
    assert torch.equal(model(x), expected)


# --- the head on every compressed table --------------------------------------------------


@pytest.mark.parametrize("option", embedding_options())
@pytest.mark.usefixtures("policy")
def test_the_head_computes_with_the_compressed_table(option: Option, calls: list[str]) -> None:
    model = TiedLM()
    untie_output_embeddings(model)
    model.embed = get_method(option.method).convert(model.embed, option)
    table = model.embed
    reference_weight = (
        table.weight.detach() if isinstance(table, nn.Embedding) else table.dequantize()
    )
    bias = model.head.bias.detach()
    generator = torch.Generator().manual_seed(3)
    few, many = (
        torch.randn(2, 3, WIDTH, generator=generator),
        torch.randn(40, WIDTH, generator=generator),
    )
    with torch.inference_mode():
        out_many = model(many)
        assert calls == []  # many tokens: the float path
        assert torch.allclose(out_many, F.linear(many, reference_weight, bias), atol=1e-5)
        out_few = model(few)
    kernel = option == INT8_PER_ROW and kernels.int8_layout_ok(WIDTH)
    assert calls == (["int8_matmul"] if kernel else [])  # never the int4 kernel
    expected = F.linear(few, reference_weight, bias)
    assert out_few.shape == (2, 3, VOCAB)
    if kernel:
        assert relative_error(out_few, expected) < 1e-2  # bfloat16 activations
    else:
        assert torch.allclose(out_few, expected, atol=1e-5)


@pytest.mark.usefixtures("policy")
def test_int8_rows_of_a_width_the_kernel_cannot_take_are_dequantised(calls: list[str]) -> None:
    width = 36  # not a multiple of the kernel's vector width anywhere
    model = TiedLM(width=width)
    untie_output_embeddings(model)
    model.embed = get_method("rtn").convert(model.embed, INT8_PER_ROW)
    x = torch.randn(2, width)
    expected = F.linear(x, model.embed.dequantize(), model.head.bias)
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert calls == []


@pytest.mark.usefixtures("policy")
def test_a_tied_conv1d_computes_x_times_the_table(calls: list[str]) -> None:
    model = TiedLM(conv1d=True)
    x = torch.randn(2, 5, VOCAB)
    expected = model(x)
    untie_output_embeddings(model)
    assert isinstance(model.head, TiedHead) and model.head.transposed
    assert torch.equal(model(x), expected)
    model.embed = get_method("rtn").convert(model.embed, INT8_PER_ROW)
    reference = x @ model.embed.dequantize() + model.head.bias
    assert torch.allclose(model(x), reference, atol=1e-5)
    assert calls == []  # its per-row scales lie along the input: no int8 kernel


@pytest.mark.parametrize("option", [INT8_PER_ROW, QuantOption(4, 32, False)])
def test_the_scratch_the_head_grows_is_declared(option: Option) -> None:
    model = TiedLM()
    untie_output_embeddings(model)
    assert model.head.scratch_needs(torch.float32) == {}  # a float table: nothing to decode
    model.embed = get_method("rtn").convert(model.embed, option)
    workspace.release()
    with torch.inference_mode():
        model(torch.randn(40, WIDTH))  # many tokens: the dequantising path
    declared = model.head.scratch_needs(torch.float32)
    assert declared["weight"] == VOCAB * WIDTH * 4
    assert 0 < workspace.held_bytes() <= sum(declared.values())
    assert model.embed.scratch_needs(torch.float32) == {}  # the lookup alone needs none
    workspace.release()


def test_a_compressed_table_is_stored_once() -> None:
    model = TiedLM()
    untie_output_embeddings(model)
    model.embed = get_method("rtn").convert(model.embed, INT8_PER_ROW)
    assert isinstance(model.embed, QuantizedEmbedding)
    state = model.state_dict()
    assert set(state) == {"embed.codes", "embed.scales", "head.bias"}
