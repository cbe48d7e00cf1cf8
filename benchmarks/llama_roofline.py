"""llama.cpp's own speed per GGML type against the roofline's price for ``--runtime llama.cpp``.

For each model, every compressible layer is given one type at a time: one GGUF file per
type, written by autotune and timed in llama.cpp on this machine, every file in turn each
round (``--target local``'s latency model, :mod:`autotune.export.llama_latency`), at two
shapes: a prompt of 1 x 128 tokens and one decode step after 127 tokens. The same uniform
plans are priced on the ``cpu`` target for ``--runtime llama.cpp`` two ways:

* **block kernel**: llama.cpp's kernel for quantised types (``gguf_block``: the packed
  blocks read at the roofline, one matrix-multiplication node per layer); float types dense;
* **dequantising**: without that kernel, as autotune's own modules run them (the float
  weight rebuilt on every call), which is how such plans were priced before.

A plan's choice between types depends on their relative cost, so each type's time is shown
over F16's (below 1: faster than F16), measured and predicted; absolute seconds differ by
machine (the ``cpu`` entry was fitted on another CPU; ``--fit-target`` refits it), and are
printed for reference. Models: tiny-lm (256 wide: only the 32-wide block types fit every
layer) and a Llama built from a config with rows that are multiples of 256 (8 blocks x 512,
MLP 1536, random weights: speed does not depend on them), so K-quants apply.

Run: ``python benchmarks/llama_roofline.py`` (a few minutes on 2 cores; needs
``pip install 'autotune[llama]'``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import dataclasses
import statistics
from typing import Any

import torch
import transformers
from torch import nn

from autotune.costs import build_costs
from autotune.export.llama_cpp import available
from autotune.layers import compressible_layers
from autotune.loading import load_model
from autotune.runtimes import get_runtime
from autotune.targets import get_target
from methods.base import Option
from methods.gguf import GGUFOption
from methods.registry import method_of
from profilers.execution.adapters import adapter_for

TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "IQ4_NL", "Q3_K", "Q2_K")


def config_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def uniform_options(model: nn.Module) -> tuple[list, dict[str, list[Option]], list[str]]:
    """The model's layers, each offered every type that fits all of them, and those types."""
    layers = compressible_layers(model)
    fitting = [
        name
        for name in TYPES
        if all(method_of(GGUFOption(name)).supports(r.shape) for r in layers)
        and all(GGUFOption(name).tensor_type.fits(r.shape.cols) for r in layers)
    ]
    return layers, {r.name: [GGUFOption(t) for t in fitting] for r in layers}, fitting


def shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, 128), generator=torch.Generator().manual_seed(1))
    return {
        "prompt 1x128": {"input_ids": ids},
        "decode after 127": adapter_for(model).decode_inputs(model, ids),
    }


def uniform_seconds(costs: Any, types: list[str]) -> dict[str, float]:
    """Whole-model seconds of each uniform plan in a cost model."""
    return {
        name: sum(costs.seconds[layer][i] for layer in costs.seconds) + costs.fixed_seconds
        for i, name in enumerate(types)
    }


def rows(model_name: str, model: nn.Module) -> list[list[str]]:
    layers, options, types = uniform_options(model)
    llama = get_runtime("llama.cpp")
    named = llama.spec_for(get_target("cpu"))
    without = dataclasses.replace(
        named, kernels={k: v for k, v in named.kernels.items() if k != "gguf_block"}
    )
    local = llama.spec_for(get_target("local"))
    found = []
    for shape, inputs in shapes(model).items():
        priced = {
            "measured": uniform_seconds(build_costs(model, layers, options, local, inputs), types),
            "block": uniform_seconds(build_costs(model, layers, options, named, inputs), types),
            "dequant": uniform_seconds(build_costs(model, layers, options, without, inputs), types),
        }
        relative = {
            way: {t: seconds[t] / seconds["F16"] for t in types} for way, seconds in priced.items()
        }
        for t in types:
            measured = relative["measured"][t]
            found.append(
                [
                    model_name,
                    shape,
                    t,
                    f"{1e3 * priced['measured'][t]:.2f}",
                    f"{measured:.2f}",
                    f"{relative['block'][t]:.2f} ({relative['block'][t] / measured:.2f})",
                    f"{relative['dequant'][t]:.2f} ({relative['dequant'][t] / measured:.2f})",
                    f"{1e3 * priced['block'][t]:.2f}",
                ]
            )
        for way in ("block", "dequant"):
            errors = [abs(relative[way][t] / relative["measured"][t] - 1) for t in types]
            print(
                f"{model_name}, {shape}: {way} median |predicted/measured - 1| of the time "
                f"over F16's: {statistics.median(errors):.2f}",
                file=sys.stderr,
            )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny-lm,llama-8x512")
    args = parser.parse_args()
    if not available():
        sys.exit("llama.cpp is not installed: pip install 'autotune[llama]'")
    table = []
    for name in args.models.split(","):
        model = config_llama() if name == "llama-8x512" else load_model(name).model
        table += rows(name, model)
    print(
        "| model | shape | type | measured ms | measured / F16 | block kernel / F16 "
        "(x measured) | dequantising / F16 (x measured) | block kernel ms |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
