"""Help texts and options that several commands share."""

from __future__ import annotations

import argparse

MODEL_HELP = (
    "'demo' (the bundled all-MiniLM-L6-v2), 'tiny-lm' or 'small-lm' (the bundled small causal "
    "LMs; small-lm's rows all take llama.cpp's K-quants), a local model folder, or a model id "
    "in the local cache"
)
PLANNED_MODEL_HELP = f"the model the plan was made for: {MODEL_HELP}"
TARGET_HELP = (
    "hardware target: a name or alias listed by 'autotune targets', or local (this machine, "
    "probed and timed)"
)
TARGET_FILE_HELP = "extra target JSON file, in the registry's format (repeatable)"
PLAN_HELP = "plan JSON file (autotune tune -o)"
CACHE_HELP = (
    "sensitivity cache folder (default: $AUTOTUNE_CACHE, else $XDG_CACHE_HOME/autotune, "
    "else ~/.cache/autotune)"
)
CALIBRATION_HELP = "text file for calibration (default: stdlib docstrings)"


def add_low_memory(parser: argparse.ArgumentParser) -> None:
    """``--low-memory``: work block by block."""
    parser.add_argument(
        "--low-memory",
        action="store_true",
        help="work block by block, reading one block's weights at a time, so that a model "
        "larger than memory can be handled (chosen by itself when the model's weights "
        "take more than a third of the memory available)",
    )


def add_common(parser: argparse.ArgumentParser) -> None:
    """``--json``, ``--quiet`` and ``--trust-remote-code``."""
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let transformers run the model's own code from its folder or cache",
    )
