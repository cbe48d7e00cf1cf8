"""Models streamed from safetensors one block at a time: same outputs as in memory, no block
left in memory between passes, checkpoints read tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from torch import nn

from autotune.fingerprint import fingerprint
from profilers.execution.checkpoint import Checkpoint, CheckpointError, parameters_on_meta
from profilers.execution.streaming import StreamedModel
from profilers.opcount import rest_of_model

VOCAB = 96


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    decoder = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    if kind == "llama":
        config = transformers.LlamaConfig(**decoder, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(config).eval()
    if kind == "llama-tied":
        config = transformers.LlamaConfig(**decoder, tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(config).eval()
    if kind == "mistral":
        config = transformers.MistralConfig(**decoder, sliding_window=8)
        return transformers.MistralForCausalLM(config).eval()
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=3, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
            eos_token_id=0,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config).eval()
    if kind == "opt":
        config = transformers.OPTConfig(
            num_hidden_layers=3, hidden_size=32, ffn_dim=64, num_attention_heads=4,
            vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=32,
        )  # fmt: skip
        return transformers.OPTForCausalLM(config).eval()
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    return transformers.BertModel(config).eval()


KINDS = ["llama", "llama-tied", "mistral", "gpt2", "opt", "bert"]


def batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    out = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 8:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def saved(model: nn.Module, folder: Path, shard: str | None = "30KB") -> Path:
    if shard:
        model.save_pretrained(folder, max_shard_size=shard)
    else:
        model.save_pretrained(folder)
    return folder


def streamed_from(folder: Path, cls: type) -> StreamedModel:
    config = transformers.AutoConfig.from_pretrained(folder)
    with parameters_on_meta():
        skeleton = cls._from_config(config)
    return StreamedModel(skeleton, Checkpoint(folder))


def main_output(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_outputs_equal_the_model_in_memory(kind: str, tmp_path: Path) -> None:
    model = build(kind)
    streamed = streamed_from(saved(model, tmp_path), type(model))
    assert len(list(tmp_path.glob("*.safetensors"))) > 1  # sharded
    data = batches()
    got = streamed.forward(data)
    with torch.inference_mode():
        for batch, out in zip(data, got, strict=True):
            assert torch.equal(main_output(out), main_output(model(**batch)))
    # no block's weights stay in memory between passes: only the outer modules' do
    blocks = [block for _, block in streamed.blocks]
    assert all(p.device.type == "meta" for block in blocks for p in block.parameters())
    outer = [p for p in streamed.model.parameters() if p.device.type != "meta"]
    assert outer and sum(p.numel() for p in outer) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_one_pass_loads_each_block_for_its_turn_and_counts_as_in_memory(
    kind: str, tmp_path: Path
) -> None:
    model = build(kind)
    streamed = streamed_from(saved(model, tmp_path), type(model))
    inputs = {"input_ids": torch.randint(0, VOCAB, (1, 16))}
    with torch.inference_mode():
        assert torch.equal(
            main_output(streamed.forward_pass(**inputs)), main_output(model(**inputs))
        )

    def weight_layers(m: nn.Module) -> list[nn.Module]:
        return [x for x in m.modules() if isinstance(x, (nn.Linear, nn.Embedding))]

    # reading the weights is not counted as the model's work
    assert rest_of_model(
        streamed.model, inputs, weight_layers(streamed.model), streamed.forward_pass
    ) == rest_of_model(model, inputs, weight_layers(model))


def test_the_fingerprint_read_tensor_by_tensor_is_the_one_in_memory(tmp_path: Path) -> None:
    model = build("llama-tied")
    streamed = streamed_from(saved(model, tmp_path), type(model))
    assert fingerprint(streamed.model, streamed.state_tensors()) == fingerprint(model)


def test_parameters_go_to_meta_and_buffers_keep_their_values() -> None:
    reference = build("llama")
    with parameters_on_meta():
        skeleton = transformers.LlamaForCausalLM(reference.config)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    rotary = skeleton.model.rotary_emb.inv_freq
    assert rotary.device.type == "cpu"
    assert torch.equal(rotary, reference.model.rotary_emb.inv_freq)
    # outside the context parameters are made as usual
    assert nn.Linear(4, 4).weight.device.type == "cpu"


def test_a_checkpoint_reads_single_files_and_every_dtype(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(2, 2).half(),
    }
    safetensors.torch.save_file(tensors, str(tmp_path / "model.safetensors"))
    checkpoint = Checkpoint(tmp_path)
    assert set(checkpoint.names) == set(tensors)
    assert checkpoint.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, tensor in tensors.items():
        assert torch.equal(checkpoint.read(name), tensor)


def test_a_sharded_checkpoint_follows_its_index(tmp_path: Path) -> None:
    model = build("opt")
    saved(model, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    checkpoint = Checkpoint(tmp_path)
    assert set(checkpoint.names) == set(index["weight_map"])
    state = model.state_dict()
    name = next(iter(index["weight_map"]))
    assert torch.equal(checkpoint.read(name), state[name])


def test_pickled_checkpoints_are_never_read(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"pickled \.bin checkpoints are never loaded"):
        Checkpoint(tmp_path)


def test_a_truncated_file_and_a_missing_tensor_are_named(tmp_path: Path) -> None:
    model = build("llama")
    saved(model, tmp_path, shard=None)
    weights = tmp_path / "model.safetensors"
    checkpoint = Checkpoint(tmp_path)
    name = "model.layers.2.mlp.down_proj.weight"
    last = max(checkpoint.names, key=lambda n: checkpoint.entries[n].offset)
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.read(last)
    safetensors.torch.save_file(
        {k: v for k, v in model.state_dict().items() if k != name}, str(weights)
    )
    with pytest.raises(CheckpointError, match="are not in the checkpoint") as info:
        streamed_from(tmp_path, transformers.LlamaForCausalLM)
    assert name in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [
        (2**40).to_bytes(8, "little") + b"{}",
        (5).to_bytes(8, "little") + b"{{{{{",
        (2).to_bytes(8, "little") + b"[]",
        (40).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [1, 1]}}',
        (56).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": 4}}',
        b"abc",
    ],
    ids=["huge-length", "garbage", "list", "no-offsets", "scalar-offsets", "short"],
)
def test_a_corrupt_safetensors_header_is_one_checkpoint_error(tmp_path, raw) -> None:
    from profilers.execution.checkpoint import Checkpoint, CheckpointError

    (tmp_path / "model.safetensors").write_bytes(raw + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        Checkpoint(tmp_path)
