"""autotune's default tune beside other weight-compression tools, at equal stored bytes.

Each peer row is one tool at one setting, run on a fresh copy of the float model:

* **NNCF** (``nncf.compress_weights``, PyTorch backend): int4 symmetric in groups of 128
  with AWQ and scale estimation, every layer at int4 (ratio 1.0, NNCF's default int8
  embeddings and last layer, and ``all_layers`` where those go to int4 too) or 80% of them
  (ratio 0.8, the rest int8), and int8 asymmetric per channel. Where AWQ or scale estimation
  fails, the row falls back to plain data-aware int4 and its setting says so (the PyTorch
  backend has no 3-bit mode: sizes 3 and 3.5 have no NNCF row);
* **HQQ** (``HQQLinear``, on the CPU with float32 compute): 3-bit and 4-bit in groups of 64
  and 128, and 8-bit, for every linear layer of the encoder or decoder blocks; the weight
  layers outside the blocks (embeddings, an untied head, a pooler) get int8 asymmetric per
  channel, as NNCF gives them by default, so that every peer stores them alike. Its scales
  and zeros are kept in float16, as HQQ keeps them at its default compute dtype
  (``--hqq-meta float32`` keeps what float32 compute leaves);
* **uniform GPTQ**: one of autotune's own GPTQ options (``autotune.apply.compress``) for
  every linear layer of the blocks, fitted on the calibration windows, and int8 outside the
  blocks as for HQQ.

The peer's stored bytes are then the budget of ``autotune(model, f"{bytes}B", "cpu")``, the
default tune in every other respect: the calibration texts given as for every tool, the
held-out texts below for its own measurement, and its sensitivity cache in a folder of this
run, so that the first tune of a model profiles every layer and the later ones (at other
budgets) reuse that profile, as repeated tunes of one model do by default.

Data. Every tool calibrates on the same standard-library docstrings
(``stdlib_texts("calibration")``, ``--calibration-texts`` of them): the peers on the first
calibration-plus-selection windows of them (``--calibration-windows`` + 8, of 128 tokens),
autotune on its own split of them (every fourth text selects). The held-out windows
(``--heldout-windows`` of 128 tokens, tokenised once for every tool) are cut from the
paragraphs of the Debian licence texts in ``/usr/share/common-licenses``, a source no tool
sees while it compresses.

Error, measured here on the held-out windows against the float model: the demo (a sentence
encoder) ``1 - cosine`` of the attention-mask mean-pooled last hidden state, averaged over
windows; tiny-lm the KL divergence of the compressed model's next-token distribution from the
float model's, averaged over every token. The ratio is autotune's error over the peer's.

Bytes are counted from the tensors each compressed model keeps: parameters and buffers (NNCF's
packed codes, scales and zero points in its decompressor modules included), HQQ's packed
codes, scales, zeros and biases, every float tensor left (embeddings, norms, biases) at its
dtype's size, shared storage once; autotune's are the bytes its plan measured. Bits per
weight are those whole-model bytes x 8 over the weights of every linear and embedding layer
of the float model (a tied table once).

Seconds are wall time around the compression call only (one tool at a time); autotune's
include its profiling, search, selection and measurement stages (``*``: the profile was
reused from the model's first tune).

Run: ``python benchmarks/peers.py`` (all sizes on both models; on an idle machine, ``--json
peers.json`` to keep the rows); ``--models tiny-lm --sizes 4.25,hqq-3bit-g64`` for a part;
``--quick`` for a smoke run (size 4.25, one setting per tool, few windows; about 3 minutes
on 2 cores). Each model's table is followed by the best peer at each size. Needs
``pip install 'autotune[peers]'``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder must not shadow the packages named like its files (methods)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import contextlib
import copy
import itertools
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from autotune import autotune
from autotune.apply import compress
from autotune.calibration import accepted_inputs, batch_windows, stdlib_texts, token_windows
from autotune.errors import AutotuneError
from autotune.layers import compressible_layers, weight_numel
from autotune.loading import load_model
from methods.base import Option, storage_key
from methods.gptq import GPTQOption
from methods.rtn import QuantOption
from profilers.quality import is_causal_lm

MODELS = ("demo", "tiny-lm")
LICENSES = Path("/usr/share/common-licenses")
SEQ_LEN = 128
SELECTION_WINDOWS = 8  # autotune's default selection split, read by the peers as calibration
MIN_WORDS = 12  # a licence paragraph shorter than this is a heading, not prose
SIZES = ("3", "3.5", "4.25", "5", "8")  # near these bits per weight of a layer
QUICK_SIZE = "4.25"


@dataclass
class Data:
    """One model's inputs, the same for every tool."""

    texts: list[str]  # calibration texts (autotune splits them itself)
    heldout_texts: list[str]
    single: list[dict[str, torch.Tensor]]  # calibration windows one per batch (NNCF)
    batches: list[dict[str, torch.Tensor]]  # the same windows, 8 per batch (GPTQ)
    heldout: list[dict[str, torch.Tensor]]
    reference: list[torch.Tensor]  # the float model's outputs on the held-out windows
    causal: bool
    calibration_windows: int
    heldout_windows: int


@dataclass
class Compressed:
    model: nn.Module
    seconds: float
    note: str = ""


@dataclass(frozen=True)
class Setting:
    """A peer tool at one setting; ``run(fresh, data)`` compresses a fresh float model."""

    name: str
    size: str
    tool: str
    describe: str
    run: Callable[[Callable[[], nn.Module], Data], Compressed]


@dataclass
class Row:
    model: str
    size: str
    tool: str
    setting: str
    bytes: int
    bits: float
    error: float
    seconds: float
    autotune_error: float | None = None
    autotune_bytes: int | None = None
    autotune_bytes_counted: int | None = None
    autotune_seconds: float | None = None
    autotune_plan: str | None = None
    autotune_refused: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.autotune_error is None:
            return None
        return self.autotune_error / self.error if self.error else float("nan")


# --- data ------------------------------------------------------------------------------------


def licence_paragraphs(folder: Path = LICENSES) -> list[str]:
    """Paragraphs of English prose from every regular file in ``folder``, sorted by name."""
    if not folder.is_dir():
        sys.exit(f"held-out text: {folder} is missing (Debian's licence texts; apt base-files)")
    paragraphs = []
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for block in re.split(r"\n\s*\n", text):
            words = block.split()
            if len(words) >= MIN_WORDS and sum(w.isalpha() for w in words) > len(words) / 2:
                paragraphs.append(" ".join(words))
    return paragraphs


def windows(texts: list[str], tokenizer: Any, count: int) -> list[list[int]]:
    found = token_windows(texts, tokenizer, SEQ_LEN, count)
    if len(found) < count:
        sys.exit(f"only {len(found)} windows of {SEQ_LEN} tokens in the text, {count} asked for")
    return found


def prepare(model: nn.Module, tokenizer: Any, args: argparse.Namespace) -> Data:
    accepted = accepted_inputs(model)
    texts = list(itertools.islice(stdlib_texts("calibration"), args.calibration_texts))
    heldout_texts = licence_paragraphs()
    calibration = windows(texts, tokenizer, args.calibration_windows + SELECTION_WINDOWS)
    heldout = batch_windows(windows(heldout_texts, tokenizer, args.heldout_windows), 8, accepted)
    causal = is_causal_lm(model)
    return Data(
        texts=texts,
        heldout_texts=heldout_texts,
        single=batch_windows(calibration, 1, accepted),
        batches=batch_windows(calibration, 8, accepted),
        heldout=heldout,
        reference=outputs(model, heldout, causal),
        causal=causal,
        calibration_windows=args.calibration_windows,
        heldout_windows=args.heldout_windows,
    )


# --- error and bytes -------------------------------------------------------------------------


@torch.no_grad()
def outputs(model: nn.Module, batches: list[dict], causal: bool) -> list[torch.Tensor]:
    """Next-token log-probabilities (causal LM) or mean-pooled sentence embeddings."""
    model.eval()
    found = []
    for batch in batches:
        if causal:
            logits = model(**batch, use_cache=False).logits
            found.append(torch.log_softmax(logits.float(), dim=-1))
        else:
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            found.append((hidden * mask).sum(1) / mask.sum(1))
    return found


def heldout_error(model: nn.Module, data: Data) -> float:
    """Mean KL(float || compressed) per token, or mean ``1 - cosine`` per window."""
    found = outputs(model, data.heldout, data.causal)
    if data.causal:
        pairs = zip(data.reference, found, strict=True)
        kl = sum((r.exp() * (r - f)).sum().item() for r, f in pairs)
        return kl / sum(r.shape[0] * r.shape[1] for r in data.reference)
    pairs = zip(data.reference, found, strict=True)
    cos = torch.cat([torch.cosine_similarity(r, f, dim=-1) for r, f in pairs])
    return float((1 - cos).mean())


def kept_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The tensors ``module`` itself keeps: parameters, buffers, and what HQQ keeps outside
    them (its packed codes, bias, and the scales and zeros in ``meta``)."""
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)
    meta = getattr(module, "meta", None)
    if isinstance(meta, dict) and hasattr(module, "W_q"):
        for value in (module.W_q, getattr(module, "bias", None), *meta.values()):
            if isinstance(value, torch.Tensor):
                yield value


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model keeps, shared storage counted once."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for tensor in kept_tensors(module):
            key = storage_key(tensor)
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
        if hasattr(module, "opaque_bytes"):
            total += int(module.opaque_bytes())
    return total


# --- the peers -------------------------------------------------------------------------------


def timed(fn: Callable[[], nn.Module], note: str = "") -> Compressed:
    started = time.perf_counter()
    model = fn()
    return Compressed(model, time.perf_counter() - started, note)


def block_linears(model: nn.Module) -> list[str]:
    """Linear layers inside numbered blocks (the encoder's or decoder's layers)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(part.isdigit() for part in name.split("."))
    ]


def outer_int8(model: nn.Module) -> dict[str, Option]:
    """What NNCF does by default with the weight layers outside the blocks (embeddings, an
    untied head, a pooler): int8, asymmetric, per channel; here as autotune's RTN option of
    that format, so that every peer row stores those layers alike."""
    inside = set(block_linears(model))
    return {
        ref.name: QuantOption(8, None, False)
        for ref in compressible_layers(model)
        if ref.name not in inside
    }


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def nncf_module() -> Any:
    """NNCF, its INFO log (a table of bit widths per call) silenced."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    return nncf


def run_nncf_int4(
    fresh: Callable[[], nn.Module], data: Data, *, ratio: float, all_layers: bool
) -> Compressed:
    nncf = nncf_module()
    common = {
        "mode": nncf.CompressWeightsMode.INT4_SYM,
        "group_size": 128,
        "ratio": ratio,
        "all_layers": all_layers,
        "dataset": nncf.Dataset(data.single),
        "subset_size": len(data.single),
    }
    try:
        model = fresh()
        return timed(
            lambda: nncf.compress_weights(model, awq=True, scale_estimation=True, **common)
        )
    except Exception as exc:  # a model or backend AWQ / scale estimation cannot handle
        model = fresh()
        note = f"without AWQ and scale estimation ({first_line(exc)})"
        print(f"NNCF: {note}", file=sys.stderr)
        return timed(lambda: nncf.compress_weights(model, **common), note)


def run_nncf_int8(fresh: Callable[[], nn.Module], data: Data) -> Compressed:
    nncf = nncf_module()
    model = fresh()
    dataset = nncf.Dataset(data.single[:1])  # traces the model; int8 is data-free
    mode = nncf.CompressWeightsMode.INT8_ASYM
    return timed(lambda: nncf.compress_weights(model, mode=mode, dataset=dataset))


def run_hqq(
    fresh: Callable[[], nn.Module], data: Data, *, nbits: int, group_size: int, meta: str
) -> Compressed:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model = fresh()
    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    meta_dtype = getattr(torch, meta)

    def quantize() -> nn.Module:
        compress(model, outer_int8(model))
        for name in block_linears(model):
            layer = HQQLinear(
                model.get_submodule(name), config, compute_dtype=torch.float32, device="cpu"
            )
            for key in ("scale", "zero"):
                layer.meta[key] = layer.meta[key].to(meta_dtype)
            model.set_submodule(name, layer)
        return model

    return timed(quantize)


def run_gptq(fresh: Callable[[], nn.Module], data: Data, *, label: str) -> Compressed:
    option = gptq_option(label)
    model = fresh()
    options = {**outer_int8(model), **dict.fromkeys(block_linears(model), option)}
    return timed(lambda: compress(model, options, data.batches))


def gptq_option(label: str) -> GPTQOption:
    """autotune's GPTQ option of ``label`` (e.g. ``gptq4-g128-sym-ao``)."""
    match = re.fullmatch(r"gptq(\d)-g(\d+)-(sym|asym)-ao", label)
    if match is None:
        raise ValueError(f"not a GPTQ label of the form gptq4-g128-sym-ao: {label}")
    bits, group, kind = match.groups()
    option = GPTQOption(bits=int(bits), group_size=int(group), symmetric=kind == "sym")
    assert option.label == label, (option.label, label)
    return option


def settings(hqq_meta: str) -> list[Setting]:
    """Every peer setting, by the size (bits per weight of a compressed layer) it is near."""
    nncf4 = "int4 sym g128, AWQ + scale estimation"
    nncf_int4 = partial(run_nncf_int4, ratio=1.0, all_layers=False)
    found = [
        Setting("nncf-int4-g128", "4.25", "NNCF", f"{nncf4}, ratio 1.0", nncf_int4),
        Setting(
            "nncf-int4-g128-all",
            "4.25",
            "NNCF",
            f"{nncf4}, ratio 1.0, all_layers",
            partial(run_nncf_int4, ratio=1.0, all_layers=True),
        ),
        Setting(
            "nncf-int4-g128-r0.8",
            "5",
            "NNCF",
            f"{nncf4}, ratio 0.8 (rest int8)",
            partial(run_nncf_int4, ratio=0.8, all_layers=False),
        ),
        Setting("nncf-int8", "8", "NNCF", "int8 asym per channel", run_nncf_int8),
    ]
    for size, nbits, group in (
        ("3", 3, 128),
        ("3.5", 3, 64),
        ("4.25", 4, 128),
        ("5", 4, 64),
        ("8", 8, 128),
    ):
        run = partial(run_hqq, nbits=nbits, group_size=group, meta=hqq_meta)
        found.append(Setting(f"hqq-{nbits}bit-g{group}", size, "HQQ", f"{nbits}-bit g{group}", run))
    for size, label in (
        ("3", "gptq3-g128-asym-ao"),
        ("3.5", "gptq3-g64-asym-ao"),
        ("4.25", "gptq4-g128-sym-ao"),
        ("5", "gptq4-g64-asym-ao"),
    ):
        found.append(Setting(label, size, "uniform GPTQ", label, partial(run_gptq, label=label)))
    return sorted(found, key=lambda s: SIZES.index(s.size))


def chosen_settings(
    all_settings: list[Setting], wanted: list[str], one_per_tool: bool
) -> list[Setting]:
    """The settings named in ``wanted`` (sizes or setting names); with ``one_per_tool``, only
    the first of each tool."""
    known = {s.size for s in all_settings} | {s.name for s in all_settings}
    unknown = sorted(set(wanted) - known)
    if unknown:
        sys.exit(f"unknown size or setting {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    chosen = [s for s in all_settings if s.size in wanted or s.name in wanted]
    if not one_per_tool:
        return chosen
    first: dict[str, Setting] = {}
    for s in chosen:
        first.setdefault(s.tool, s)
    return list(first.values())


# --- one row ---------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The tools' progress output on stderr, so that stdout holds the tables."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def run_peer(model_name: str, setting: Setting, float_model: nn.Module, data: Data) -> Row:
    with quiet():
        done = setting.run(lambda: copy.deepcopy(float_model), data)
    size = stored_bytes(done.model)
    describe = f"{setting.describe} [{done.note}]" if done.note else setting.describe
    return Row(
        model=model_name,
        size=setting.size,
        tool=setting.tool,
        setting=describe,
        bytes=size,
        bits=8 * size / weight_numel(float_model),
        error=heldout_error(done.model, data),
        seconds=done.seconds,
        extra={"name": setting.name},
    )


def run_autotune(row: Row, float_model: nn.Module, tokenizer: Any, data: Data, cache: Path) -> None:
    """autotune's default tune at the row's bytes, its figures written into ``row``;
    ``cache`` is the sensitivity cache the tunes of one model share."""
    model = copy.deepcopy(float_model)
    started = time.perf_counter()
    try:
        with quiet():
            result = autotune(
                model,
                f"{row.bytes}B",
                "cpu",
                tokenizer=tokenizer,
                calibration=data.texts,
                heldout=data.heldout_texts,
                calibration_windows=data.calibration_windows,
                heldout_windows=data.heldout_windows,
                progress=False,
                cache=cache,
                inplace=True,
            )
    except AutotuneError as exc:  # e.g. a budget below every plan autotune can make
        row.autotune_refused = first_line(exc)
        return
    row.autotune_seconds = time.perf_counter() - started
    row.autotune_error = heldout_error(result.model, data)
    row.autotune_bytes_counted = stored_bytes(result.model)
    row.autotune_bytes = int(result.plan.measured.get("bytes", row.autotune_bytes_counted))
    row.autotune_plan = str(result.plan.search.get("chosen", ""))
    row.extra["autotune_sensitivity_cached"] = result.plan.search.get("sensitivity_cached", 0)
    row.extra["autotune_stage_seconds"] = result.plan.search.get("stage_seconds", {})


# --- output ----------------------------------------------------------------------------------


def number(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def reused(row: Row) -> bool:
    """Whether autotune's tune took its sensitivity profile from an earlier tune's cache."""
    return bool(row.extra.get("autotune_sensitivity_cached"))


def print_table(model_name: str, float_model: nn.Module, causal: bool, rows: list[Row]) -> None:
    size = stored_bytes(float_model)
    bits = 8 * size / weight_numel(float_model)
    metric = "next-token KL" if causal else "1 - cosine of the mean-pooled embeddings"
    print(f"\n### {model_name} (float: {size:,} bytes, {bits:.2f} bits/weight; error: {metric})\n")
    print(
        "| size | tool | setting | bytes | bits/weight | held-out error "
        "| autotune default at the same bytes | ratio autotune/peer "
        "| seconds (peer) | seconds (autotune) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mine = number(r.autotune_error, ".4g") if r.autotune_refused is None else "refused"
        print(
            f"| {r.size} | {r.tool} | {r.setting} | {r.bytes:,} | {r.bits:.2f} "
            f"| {r.error:.4g} | {mine} | {number(r.ratio, '.3g')} | {r.seconds:.1f} "
            f"| {number(r.autotune_seconds, '.1f')}{'*' if reused(r) else ''} |",
            flush=True,
        )
    if any(reused(r) for r in rows):
        print(
            "\n\\* autotune reused the sensitivity profile of this model's first tune (its cache)"
        )
    for r in rows:
        if r.autotune_refused:
            print(f"- {r.tool} {r.setting}: autotune refused the budget: {r.autotune_refused}")
        elif r.autotune_bytes is not None and r.autotune_bytes > r.bytes:
            print(f"- {r.tool} {r.setting}: autotune's plan is {r.autotune_bytes:,} bytes")


def print_summary(model_name: str, rows: list[Row]) -> None:
    """Per size: the peer with the least held-out error, and autotune at its bytes."""
    for size in dict.fromkeys(r.size for r in rows):
        best = min((r for r in rows if r.size == size), key=lambda r: r.error)
        print(
            f"{model_name}, size {size}: best peer {best.tool} {best.setting} "
            f"({best.bytes:,} bytes, error {best.error:.4g}); autotune at those bytes "
            f"{number(best.autotune_error, '.4g')}, ratio {number(best.ratio, '.3g')}"
        )
        for r in rows:
            if r.size == size and r is not best:
                print(f"    {r.tool} {r.setting}: {r.error / best.error:.2f}x the best peer")


def write_json(
    path: Path, rows: list[Row], failed: list[dict[str, str]], args: argparse.Namespace
) -> None:
    """The rows as JSON, written to a temporary file first and then moved into place."""
    payload = {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "rows": [{**asdict(r), "ratio": r.ratio} for r in rows],
        "failed": failed,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        json.dump(payload, out, indent=2)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument(
        "--sizes",
        default=",".join(SIZES),
        help="comma-separated sizes (3, 3.5, 4.25, 5, 8) or setting names (hqq-3bit-g64)",
    )
    parser.add_argument("--heldout-windows", type=int, default=32, help="of 128 tokens")
    parser.add_argument("--calibration-windows", type=int, default=32, help="of 128 tokens")
    parser.add_argument("--calibration-texts", type=int, default=1200, help="docstrings")
    parser.add_argument("--hqq-meta", choices=("float16", "float32"), default="float16")
    parser.add_argument("--quick", action="store_true", help="smoke run: one size, few windows")
    parser.add_argument("--peers-only", action="store_true", help="no autotune runs")
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    args = parser.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = sorted(set(args.models) - set(MODELS))
    if bad:
        parser.error(f"unknown model(s) {', '.join(bad)}; allowed: {', '.join(MODELS)}")
    if args.quick:
        args.sizes = [QUICK_SIZE]
        args.heldout_windows = min(args.heldout_windows, 8)
        args.calibration_windows = min(args.calibration_windows, 4)
        args.calibration_texts = min(args.calibration_texts, 400)
    return args


def run_model(
    model_name: str,
    chosen: list[Setting],
    args: argparse.Namespace,
    done: list[Row],
    failed: list[dict[str, str]],
) -> None:
    """Every chosen setting on one model, each followed by autotune at its bytes, its rows
    added to ``done`` and the settings that failed to ``failed`` (both written to ``--json``
    after each setting)."""
    loaded = load_model(model_name)
    float_model, tokenizer = loaded.model.eval(), loaded.tokenizer
    data = prepare(float_model, tokenizer, args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="peers-cache-") as cache:
        for setting in chosen:
            print(f"{model_name}: {setting.name}", file=sys.stderr, flush=True)
            try:
                row = run_peer(model_name, setting, float_model, data)
            except Exception as exc:  # a tool that cannot compress this model: said, not fatal
                failed.append(
                    {"model": model_name, "setting": setting.name, "error": first_line(exc)}
                )
                print(
                    f"{model_name}: {setting.name} failed: {failed[-1]['error']}", file=sys.stderr
                )
                continue
            if not args.peers_only:
                run_autotune(row, float_model, tokenizer, data, Path(cache))
            print(
                f"{model_name}: {setting.name} error {row.error:.4g}, autotune "
                f"{number(row.autotune_error, '.4g')}",
                file=sys.stderr,
                flush=True,
            )
            rows.append(row)
            done.append(row)
            if args.json:
                write_json(args.json, done, failed, args)
    print_table(model_name, float_model, data.causal, rows)
    for failure in failed:
        if failure["model"] == model_name:
            print(f"- {failure['setting']}: failed: {failure['error']}")
    print()
    print_summary(model_name, rows)


def main() -> None:
    args = parse_args()
    chosen = chosen_settings(settings(args.hqq_meta), args.sizes, args.quick)
    done: list[Row] = []
    failed: list[dict[str, str]] = []
    for model_name in args.models:
        run_model(model_name, chosen, args, done, failed)


if __name__ == "__main__":
    main()
