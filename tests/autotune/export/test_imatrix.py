"""llama.cpp's own tool reproduces autotune's GGUF: ``llama-quantize`` run with the plan's
``export.llama_quantize`` line on an F32 GGUF writes the same tensor types and the same codes,
also for importance-matrix types when given the imatrix file autotune writes. Runs where
``scripts/llama-tools`` has built llama-quantize."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from autotune.apply import apply_plan
from autotune.export import export_plan, get_exporter
from autotune.export.gguf import describe
from autotune.export.imatrix import write_imatrix
from autotune.export.llama_tools import find_tool
from autotune.plan import Plan
from tests.autotune.export.test_gguf import make_model, plan_for

QUANTIZE = find_tool("llama-quantize")
pytestmark = pytest.mark.skipif(
    QUANTIZE is None, reason="llama-quantize is not built (bash scripts/llama-tools)"
)


def tensors_of(path: Path) -> dict[str, tuple[str, bytes]]:
    import gguf

    return {
        t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in gguf.GGUFReader(path).tensors
    }


def run_plans_line(
    plan: Plan, model, folder: Path, imatrix: Path | None = None, tokenizer=None
) -> Path:
    """The plan's llama-quantize line, run on an F32 GGUF of ``model``."""
    source, out = folder / "f32.gguf", folder / "quantized.gguf"
    get_exporter("gguf").write(model, None, source, None)
    compressed = apply_plan(model, plan, tokenizer=tokenizer)
    line = describe(compressed, list(plan.options().values()))["llama_quantize"]
    places = {"model-f32.gguf": str(source), "model.gguf": str(out), "imatrix.gguf": str(imatrix)}
    args = [places.get(a, a) for a in shlex.split(line)]
    subprocess.run([str(QUANTIZE), *args[1:]], check=True, capture_output=True, timeout=300)
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_llama_quantize_with_the_plans_line_writes_the_same_tensors(
    family: str, tmp_path: Path
) -> None:
    plan, model = plan_for(family, "k-quants"), make_model(family)
    ours = tmp_path / "ours.gguf"
    export_plan(plan, model, "gguf", ours)
    theirs = run_plans_line(plan, model, tmp_path)
    assert tensors_of(theirs) == tensors_of(ours)


WEIGHTED = {"method": "gguf", "imatrix": True}
IMATRIX_PLANS = {  # plain types beside weighted ones; name: (layers, weighted layers)
    "llama": (
        {
            "_default": {**WEIGHTED, "type": "Q4_K"},
            r"re:.*down_proj": {**WEIGHTED, "type": "IQ4_XS"},
            r"re:.*v_proj": {**WEIGHTED, "type": "IQ2_XXS"},
            r"re:.*q_proj": {"method": "gguf", "type": "Q5_K"},
            "model.embed_tokens": {"method": "gguf", "type": "Q6_K"},
        },
        13,
    ),
    "gpt2": (  # Conv1D layers: the matrix is over their input columns all the same
        {
            "_default": {**WEIGHTED, "type": "Q4_K"},
            r"re:.*mlp\.c_proj": {**WEIGHTED, "type": "IQ4_XS"},
            r"re:.*c_attn": {**WEIGHTED, "type": "IQ2_XXS"},
            r"re:.*attn\.c_proj": {"method": "gguf", "type": "Q5_K"},
            "transformer.wte": {"method": "gguf", "type": "Q6_K"},
            "transformer.wpe": {"method": "none"},
        },
        7,
    ),
}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_with_autotunes_imatrix_file_llama_quantize_writes_the_same_codes(
    family: str, bpe_tokenizer, tmp_path: Path
) -> None:
    layers, weighted = IMATRIX_PLANS[family]
    plan = Plan(
        layers=layers, calibration={"seq_len": 64, "calibration_windows": 8, "batch_size": 4}
    )
    model = make_model(family)
    ours = tmp_path / "ours.gguf"
    export_plan(plan, model, "gguf", ours, tokenizer=bpe_tokenizer)
    imatrix = tmp_path / "imatrix.gguf"
    assert write_imatrix(model, plan, imatrix, tokenizer=bpe_tokenizer) == weighted
    theirs = run_plans_line(plan, model, tmp_path, imatrix, bpe_tokenizer)
    assert tensors_of(theirs) == tensors_of(ours)
