"""The options of ``autotune profile``."""

from __future__ import annotations

from typing import Any

from autotune.cli.arguments.shared import (
    CACHE_HELP,
    CALIBRATION_HELP,
    MODEL_HELP,
    TARGET_FILE_HELP,
    TARGET_HELP,
    add_common,
)


def add_profile(sub: Any) -> None:
    """Add ``profile``: sensitivity and cost tables of every layer and option."""
    profile = sub.add_parser(
        "profile", help="sensitivity and cost tables of every layer and option"
    )
    profile.add_argument("model", help=MODEL_HELP)
    profile.add_argument("--target", default="local", help=TARGET_HELP)
    profile.add_argument("--target-file", action="append", default=[], help=TARGET_FILE_HELP)
    profile.add_argument("--calibration", help=CALIBRATION_HELP)
    profile.add_argument(
        "--batch-size", type=int, default=1, help="batch size latency is judged at"
    )
    profile.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    profile.add_argument("--methods", help="comma-separated methods (default: as tune)")
    profile.add_argument(
        "--runtime",
        default="torch",
        metavar="RUNTIME",
        help="what runs the plans, as in tune (torch, vllm, onnxruntime, llama.cpp): its "
        "options and prices; with --fit-target and llama.cpp, fits the target's figures "
        "for llama.cpp to timings in llama.cpp",
    )
    profile.add_argument(
        "--sensitivity",
        default="end-to-end",
        metavar="ESTIMATOR",
        help="an estimator registered in autotune.estimators: end-to-end output error "
        "(cached), fisher or local (cheap proxies)",
    )
    profile.add_argument(
        "-o", "--output", help="write the tables as JSON here (and a CSV beside it)"
    )
    profile.add_argument("--csv", help="where the CSV goes (default: OUTPUT with .csv)")
    profile.add_argument(
        "--fit-target",
        metavar="FILE",
        help="fit the target's roofline to latencies measured here (with --runtime llama.cpp: "
        "its figures for llama.cpp, timed in llama.cpp); write the entry to FILE",
    )
    profile.add_argument("--cache-dir", help=CACHE_HELP)
    profile.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    add_common(profile)
