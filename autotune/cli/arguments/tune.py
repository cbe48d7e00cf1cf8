"""The options of ``autotune tune``."""

from __future__ import annotations

import argparse
from typing import Any

from autotune.cli.arguments.shared import (
    CACHE_HELP,
    CALIBRATION_HELP,
    MODEL_HELP,
    TARGET_FILE_HELP,
    TARGET_HELP,
    add_common,
    add_low_memory,
)


def add_tune(sub: Any) -> None:
    """Add ``tune``: find the best plan for a budget on a target."""
    tune = sub.add_parser("tune", help="find the best plan for a budget on a target")
    _add_problem(tune)
    _add_shape(tune)
    _add_space(tune)
    _add_search(tune)
    _add_pruning(tune)
    add_low_memory(tune)
    add_common(tune)


def _add_problem(tune: argparse.ArgumentParser) -> None:
    """The model, budget and target, what is written, and the text it is judged on."""
    tune.add_argument("model", help=MODEL_HELP)
    tune.add_argument(
        "--budget",
        required=True,
        help="one word, e.g. 15MB, 8GiB, 4.5bits, 25%%, 20ms, decode=5ms, 0.7x (of the "
        "original's latency) or 8GB,20ms",
    )
    tune.add_argument("--target", default="local", help=TARGET_HELP)
    tune.add_argument("--target-file", action="append", default=[], help=TARGET_FILE_HELP)
    tune.add_argument("-o", "--output", help="write the plan JSON here")
    tune.add_argument("--save-model", metavar="DIR", help="also save the compressed model here")
    tune.add_argument(
        "--export",
        metavar="PATH",
        help="also write the compressed model in the --runtime's format (onnx, gguf: a file; "
        "compressed-tensors: a folder)",
    )
    tune.add_argument("--calibration", help=CALIBRATION_HELP)
    tune.add_argument(
        "--heldout", help="text file held out for validation (default: stdlib docstrings)"
    )
    tune.add_argument(
        "--seed", type=int, default=0, help="random seed of calibration sampling and search"
    )


def _add_shape(tune: argparse.ArgumentParser) -> None:
    """The batch, context and sequence the budget is judged at."""
    tune.add_argument(
        "--batch-size",
        "--batch",
        type=int,
        default=1,
        help="batch size latency (and, with --context, the KV cache) is judged at",
    )
    tune.add_argument(
        "--context",
        type=int,
        help="causal LMs: tokens kept per sequence; the memory budget then covers weights + "
        "KV cache + activation peak",
    )
    tune.add_argument(
        "--kv-dtype",
        default="float16",
        help="KV cache element type with --context: float32, float16, bfloat16, float8",
    )
    tune.add_argument("--seq-len", type=int, default=128, help="tokens per sequence for latency")


def _add_space(tune: argparse.ArgumentParser) -> None:
    """The options offered, what runs them, and how they are scored."""
    tune.add_argument(
        "--methods",
        help="comma-separated methods to search (default: rtn and gptq, rtn alone with "
        "--low-memory, plus w8a8 on CPU targets)",
    )
    tune.add_argument(
        "--runtime",
        default="torch",
        metavar="RUNTIME",
        help="what will run the plan: torch (autotune's modules, every option; default), vllm "
        "(GPU targets: options vLLM's kernels run from a compressed-tensors export), "
        "onnxruntime (CPU targets: options an ONNX export holds) or llama.cpp (llama.cpp's "
        "tensor types, Q8_0 ... IQ2_XXS, in a GGUF file)",
    )
    tune.add_argument(
        "--relative-to",
        metavar="FILE",
        help="a file in the --runtime's format (llama.cpp: .gguf, onnxruntime: .onnx) whose "
        "time the budget's multiples are of, timed beside the plan at every check: "
        "'--budget 2.6MB,decode=1x --relative-to Q4_K_M.gguf' (default: the original model's)",
    )
    tune.add_argument(
        "--options",
        help="comma-separated option labels to offer, e.g. int8-ch-sym,int4-g64-asym "
        "(default: every option of the methods' grids)",
    )
    tune.add_argument("--no-measure", action="store_true", help="skip measuring the result")
    tune.add_argument("--cache-dir", help=CACHE_HELP)
    tune.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    tune.add_argument(
        "--sensitivity",
        metavar="ESTIMATOR",
        help="how each (layer, option) is scored, an estimator registered in "
        "autotune.estimators: refined (the default in memory: Fisher estimates, end-to-end "
        "errors where the allocator's plan depends on them; cached), end-to-end (every pair "
        "measured), block-output (the default block by block), hybrid, fisher or local",
    )


def _add_search(tune: argparse.ArgumentParser) -> None:
    """The engine that searches beyond the allocator, its limits and its study."""
    tune.add_argument(
        "--search",
        default="auto",
        metavar="ENGINE",
        help="engine that improves on the allocator's plan by whole-model evaluations, one "
        "registered in autotune.engines (allocator, evolution, tpe, nsga2) or auto: "
        "evolution up to 1B weights in memory, the allocator alone block by block",
    )
    tune.add_argument(
        "--max-evals",
        type=float,
        help="most full-calibration evaluations the engine may spend (default 100)",
    )
    tune.add_argument(
        "--timeout", type=float, help="most seconds the engine may search (default: no limit)"
    )
    tune.add_argument(
        "--storage",
        help="Optuna storage URL to record, resume and share the search "
        "(sqlite:///study.db, postgresql://user:pw@host/db, mysql://...)",
    )
    tune.add_argument(
        "--study", help="study name in --storage (default: derived from model, data and space)"
    )
    tune.add_argument(
        "--decode-slack",
        default="runtime",
        metavar="F",
        help="with a budget that sets no decode limit, how much slower than the runtime's own "
        "file of that size the plan may generate (llama.cpp: 0.05, against its --pure file "
        "of the largest of its mixes' base types that fits); off: speed left free",
    )


def _add_pruning(tune: argparse.ArgumentParser) -> None:
    """Structured pruning done before the search."""
    tune.add_argument(
        "--prune-ffn",
        type=float,
        default=0.0,
        metavar="F",
        help="first remove this fraction of FFN neurons in every block (structured, in [0, 1))",
    )
    tune.add_argument(
        "--prune-heads",
        type=float,
        default=0.0,
        metavar="F",
        help="first remove this fraction of attention heads (key/value groups) in every block",
    )
