"""Saved compressed models: packed tensors in safetensors, the model config, and the plan.

A saved folder holds ``model.safetensors`` (exactly the compressed model's state: packed
codes, scales, offsets, and the layers left as they were), ``config.json``, ``plan.json``
and, when known, the tokenizer files. ``load_compressed`` rebuilds the model without
recompressing anything.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from autotune.errors import ModelLoadError
from autotune.io import atomic_directory
from autotune.loading import check_weights, model_class, offline
from autotune.plan import Plan
from methods.base import LayerShape
from methods.keep import KeepOption
from methods.registry import method_of

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PLAN = "plan.json"


def save_compressed(
    model: nn.Module, plan: Plan, outdir: str | Path, tokenizer: Any = None
) -> Path:
    """Write the compressed model, its config, plan and tokenizer to ``outdir`` atomically."""
    with atomic_directory(outdir) as staging:
        safetensors.torch.save_model(
            model, str(staging / WEIGHTS), metadata={"format": "pt", "producer": "autotune"}
        )
        plan.save(staging / PLAN)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config = copy.deepcopy(config)
            if not getattr(config, "architectures", None):  # built from a config: say which
                config.architectures = [type(model).__name__]
            config.save_pretrained(staging)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(staging)
    return Path(outdir)


def load_compressed(folder: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed` (no recompression)."""
    root = Path(folder)
    weights = WEIGHTS if not (root / INDEX).is_file() else INDEX
    for name in (weights, PLAN, "config.json"):
        if not (root / name).is_file():
            raise ModelLoadError(f"saved model folder {str(root)!r} lacks {name}")
    plan = Plan.load(root / PLAN)
    files = check_weights(root)  # headers checked before anything is built or read
    with offline():
        cls = model_class(root, trust_remote_code)
        try:
            import transformers

            config = transformers.AutoConfig.from_pretrained(
                root, local_files_only=True, trust_remote_code=trust_remote_code
            )
            build = getattr(cls, "from_config", None) or cls._from_config
            model = build(config) if cls is transformers.AutoModel else cls._from_config(config)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot rebuild the model from {root}/config.json: {exc}"
            ) from None
    plan.shaped(model)
    for ref, option in plan.layer_options(model).items():
        if isinstance(option, KeepOption):
            continue
        module = model.get_submodule(ref.name)
        model.set_submodule(
            ref.name, method_of(option).empty(LayerShape.of(module), option, like=module)
        )
    try:
        if weights == INDEX:  # shards written block by block (autotune.streamed)
            state = {}
            for shard in files:
                state.update(safetensors.torch.load_file(str(shard)))
            missing, unexpected = model.load_state_dict(state, strict=False)
        else:
            missing, unexpected = safetensors.torch.load_model(
                model, str(root / WEIGHTS), strict=False
            )
    except Exception as exc:
        raise ModelLoadError(f"cannot read {root / weights}: {exc}") from None
    if missing or unexpected:
        detail = (missing or unexpected)[0]
        raise ModelLoadError(
            f"{root / weights} does not match its plan: {len(missing)} missing and "
            f"{len(unexpected)} unexpected tensors (e.g. {detail!r})"
        )
    return model.eval()
