"""Train a bundled causal LM (``tiny-lm``, ``small-lm``): small Llama-architecture models.

A byte-level BPE tokenizer and the model are trained on the calibration split of the Python
standard library's docstrings (``autotune.calibration.stdlib_texts("calibration")``); the
held-out split is only used to report perplexity before and after training. Seeded, with a
fixed number of steps and a deterministic data order, on 2 CPU threads.

Usage: ``.venv/bin/python scripts/train_tiny_lm.py [--model tiny-lm|small-lm] [--steps N]
[--out DIR]``. The result is written atomically (a temporary folder renamed at the end) to
``autotune/data/<model>``; its perplexity after training is measured on the weights as stored.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from autotune.calibration import batch_windows, stdlib_texts, token_windows
from autotune.loading import BUNDLED_LMS
from profilers.quality import perplexity

SEED = 0
VOCAB = 4096
SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
CONTEXT = 256
BATCH = 16  # windows of CONTEXT tokens per step
WEIGHT_DECAY = 0.1
EVAL_WINDOWS = 64  # held-out windows of CONTEXT tokens for the reported perplexity
LOG_EVERY = 100  # steps between reports of held-out perplexity (reported, never trained on)


@dataclass(frozen=True)
class Recipe:
    """One bundled model: its architecture, schedule and the dtype its weights are stored in."""

    name: str
    arch: dict[str, Any]
    steps: int
    peak_lr: float
    warmup: int
    stored_dtype: torch.dtype
    purpose: str


RECIPES = {
    recipe.name: recipe
    for recipe in (
        # about 1 s a step of 16 x 256 tokens on 2 idle CPU threads: 600 steps take 10 to 14
        # minutes
        Recipe(
            name="tiny-lm",
            arch={
                "hidden_size": 256,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,  # grouped-query attention: two query heads a k/v head
                "intermediate_size": 640,
                # untied: the tuner leaves shared weights in float32, so tied tables would keep
                # a quarter of the model out of the search; untied, the embedding and the
                # output head are two separately compressible layers (and 4.85M parameters
                # still fit 20 MB in float32)
                "tie_word_embeddings": False,
            },
            steps=600,
            peak_lr=2e-3,
            warmup=60,
            stored_dtype=torch.float32,
            purpose="`autotune tune tiny-lm --budget 40% --target cpu` tunes a trained decoder "
            "offline",
        ),
        # every row a multiple of 256 (llama.cpp's K-quant super-block); about 2.3 s a step on
        # 2 idle CPU threads: 400 steps take about 16 minutes
        Recipe(
            name="small-lm",
            arch={
                "hidden_size": 512,
                "num_hidden_layers": 4,
                "num_attention_heads": 8,
                "num_key_value_heads": 4,
                "intermediate_size": 1024,
                "tie_word_embeddings": False,
            },
            steps=400,
            peak_lr=1e-3,
            warmup=40,
            # float16 halves the bundled file; the loader computes in float32
            stored_dtype=torch.float16,
            purpose="every weight row is a multiple of 256, so all of llama.cpp's K-quants "
            "apply to every tensor",
        ),
    )
}


def train_tokenizer(texts: list[str]) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``VOCAB`` ids that puts ``<s>`` before each text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIALS[1]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, tok.token_to_id(bos))],
            ),
        ]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIALS[0],
        bos_token=SPECIALS[1],
        eos_token=SPECIALS[2],
        model_max_length=CONTEXT,
    )


def build_model(tokenizer: Any, recipe: Recipe) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=CONTEXT,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **recipe.arch,
    )
    torch.manual_seed(SEED)
    return transformers.LlamaForCausalLM(config)


def token_stream(texts: list[str], tokenizer: Any) -> torch.Tensor:
    """The texts' tokens back to back, without special tokens (as the tuner cuts windows)."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([i for ids in encoded for i in ids], dtype=torch.long)


def heldout_batches(tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    windows = token_windows(stdlib_texts("heldout"), tokenizer, CONTEXT, EVAL_WINDOWS)
    return batch_windows(windows, BATCH, {"input_ids"})


def learning_rate(step: int, steps: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at ``steps``."""
    peak, warmup = recipe.peak_lr, recipe.warmup
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(
    model: transformers.LlamaForCausalLM,
    stream: torch.Tensor,
    bos: int,
    steps: int,
    monitor: list[dict[str, torch.Tensor]],
    recipe: Recipe,
) -> dict[str, Any]:
    """AdamW on next-token prediction over ``[bos] + stream[o : o + CONTEXT - 1]`` windows at
    seeded random offsets ``o``; the perplexity on ``monitor`` is only reported."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=recipe.peak_lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(SEED)
    body = CONTEXT - 1
    model.train()
    started = time.perf_counter()
    smoothed = None
    curve: list[list[float]] = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, recipe)
        offsets = torch.randint(0, len(stream) - body, (BATCH,), generator=generator)
        ids = torch.stack([stream[o : o + body] for o in offsets.tolist()])
        ids = torch.cat([torch.full((BATCH, 1), bos, dtype=torch.long), ids], dim=1)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        if (step + 1) % 25 == 0 or step == 0:
            elapsed = time.perf_counter() - started
            rate = learning_rate(step, steps, recipe)
            print(
                f"step {step + 1}/{steps}  loss {smoothed:.3f}  lr {rate:.2e}  {elapsed:.0f} s",
                flush=True,
            )
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            model.eval()
            curve.append([step + 1, round(perplexity(model, monitor), 2)])
            model.train()
            print(f"  held-out perplexity {curve[-1][1]:.1f}", flush=True)
    model.eval()
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "tokens_seen": steps * BATCH * CONTEXT,
        "final_train_loss_smoothed": round(smoothed or float("nan"), 4),
        "heldout_curve": curve,
    }


def write_readme(folder: Path, record: dict[str, Any], recipe: Recipe) -> None:
    arch = record["architecture"]
    before, after = record["heldout_perplexity_before"], record["heldout_perplexity_after"]
    intro = textwrap.fill(
        f"A small Llama-architecture causal language model bundled with autotune: "
        f"{recipe.purpose}.",
        width=95,
    )
    text = f"""# {recipe.name}

{intro}

* {record["parameters"]:,} parameters, {record["stored_dtype"]}, untied input and output
  embeddings: hidden {arch["hidden_size"]}, {arch["num_hidden_layers"]} layers, \
{arch["num_attention_heads"]} attention heads sharing {arch["num_key_value_heads"]}
  key/value heads (grouped-query attention), MLP {arch["intermediate_size"]}, context \
{CONTEXT} tokens.
* Tokenizer: byte-level BPE, {record["vocab_size"]} ids; `<s>` (bos) is put before each text,
  `</s>` is eos and `<pad>` pads.
* Data: the docstrings of the Python {record["python"]} standard library, calibration split
  only (`autotune.calibration.stdlib_texts("calibration")`, {record["train_tokens"]:,} \
tokens).
  The held-out split is used only to measure perplexity.
* Training: AdamW, {record["steps"]} steps of {record["batch"][0]} x {CONTEXT} tokens \
({record["tokens_seen"]:,} tokens seen),
  seed {record["seed"]}, {record["threads"]} CPU threads.
* Held-out perplexity ({record["eval_windows"]} windows of {CONTEXT} tokens): \
{before:.1f} before
  training, {after:.1f} after.

Made by `scripts/train_tiny_lm.py`; `TRAINING.json` records the run.
"""
    (folder / "README.md").write_text(text, encoding="utf-8")


def publish(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging`` with renames (the old folder goes only at the end)."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(RECIPES), default="tiny-lm")
    parser.add_argument("--steps", type=int, help="default: the model's recipe")
    parser.add_argument("--out", type=Path, help="default: autotune/data/<model>")
    args = parser.parse_args(argv)
    recipe = RECIPES[args.model]
    args.steps = args.steps or recipe.steps
    args.out = args.out or BUNDLED_LMS[recipe.name]
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    transformers.utils.logging.set_verbosity_error()

    texts = list(stdlib_texts("calibration"))
    tokenizer = train_tokenizer(texts)
    stream = token_stream(texts, tokenizer)
    print(f"{len(texts):,} calibration texts, {len(stream):,} tokens, vocab {len(tokenizer)}")
    model = build_model(tokenizer, recipe)
    params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {params:,} parameters")

    heldout = heldout_batches(tokenizer)
    model.eval()
    before = perplexity(model, heldout)
    print(f"held-out perplexity before training: {before:.1f}", flush=True)
    run = train(model, stream, tokenizer.bos_token_id, args.steps, heldout[:2], recipe)
    # measured on the weights as they are stored
    model.to(recipe.stored_dtype).to(torch.float32)
    after = perplexity(model, heldout)
    print(f"held-out perplexity after training: {after:.2f} ({run['seconds']:.0f} s)")

    record = {
        "model": recipe.name,
        "architecture": {k: v for k, v in recipe.arch.items() if k != "tie_word_embeddings"},
        "tie_word_embeddings": recipe.arch["tie_word_embeddings"],
        "stored_dtype": str(recipe.stored_dtype).removeprefix("torch."),
        "context": CONTEXT,
        "vocab_size": len(tokenizer),
        "parameters": params,
        "seed": SEED,
        "steps": args.steps,
        "batch": [BATCH, CONTEXT],
        "optimizer": {
            "name": "AdamW",
            "peak_lr": recipe.peak_lr,
            "warmup_steps": recipe.warmup,
            "schedule": "linear warm-up, cosine decay to 0.1 x peak",
            "betas": [0.9, 0.95],
            "weight_decay": WEIGHT_DECAY,
            "grad_clip": 1.0,
        },
        "data": "autotune.calibration.stdlib_texts('calibration')",
        "train_texts": len(texts),
        "train_tokens": len(stream),
        "tokens_seen": run["tokens_seen"],
        "epochs": round(run["tokens_seen"] / len(stream), 2),
        "final_train_loss_smoothed": run["final_train_loss_smoothed"],
        "heldout_perplexity_curve": {
            "windows": sum(len(b["input_ids"]) for b in heldout[:2]),
            "points": run["heldout_curve"],
        },
        "eval": "autotune.calibration.stdlib_texts('heldout')",
        "eval_windows": sum(len(b["input_ids"]) for b in heldout),
        "heldout_perplexity_before": round(before, 2),
        "heldout_perplexity_after": round(after, 2),
        "train_seconds": run["seconds"],
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        model.to(recipe.stored_dtype).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        # the generic class name, so that any transformers version reads tokenizer.json as is
        config_path = staging / "tokenizer_config.json"
        tok_config = json.loads(config_path.read_text(encoding="utf-8"))
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_config.pop("backend", None)
        config_path.write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
        (staging / "TRAINING.json").write_text(
            json.dumps(record, indent=2) + "\n", encoding="utf-8"
        )
        write_readme(staging, record, recipe)
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        publish(staging, args.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {args.out}: {', '.join(sorted(p.name for p in args.out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
