"""The ``autotune`` command line.

Exit codes: 0 success (``validate``: the plan holds; ``diff``: same layer options); 1 a budget
or tolerance is broken (``diff``: the plans differ); 2 bad input (a malformed command line,
unknown target, malformed budget or plan, missing model, ...), told in one line on stderr
with nothing written; 130 interrupted (``tune`` and ``profile`` keep the sensitivity
measurements they finished, so running the same command again resumes from them).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from autotune import __version__

EXIT_OK, EXIT_BROKEN, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

MODEL_HELP = (
    "'demo' (the bundled all-MiniLM-L6-v2), 'tiny-lm' (the bundled small causal LM), a local "
    "model folder, or a model id in the local cache"
)
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
_CHOOSE_FROM = re.compile(r"\(choose from (.*)\)$")
# a budget's terms, as ``autotune.budget`` reads them, so that '15 MB' is known for one
_BUDGET_TERM = (
    r"(?:[a-z]+\s*=\s*)?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:e[+-]?[0-9]+)?\s*"
    r"(?:[kmgt]i?b|b|[uµm]?s|bits?|%)"
)
_BUDGET_TEXT = re.compile(rf"{_BUDGET_TERM}(?:\s*,\s*{_BUDGET_TERM})*", re.IGNORECASE)


class UsageError(Exception):
    """A malformed command line, told in one line that names the command."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{prog}: error: {message}; run '{prog} --help' for usage")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default after its help, unless there is none or the help tells it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
        ):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors raise :class:`UsageError` (one line) instead of
    printing the usage and exiting, and which knows its options that take one value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.options: set[str] = set()  # every option string
        self.valued: set[str] = set()  # option strings that take exactly one value
        self.commands: dict[str, _Parser] = {}  # subcommand parsers, by name
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.options.update(action.option_strings)
        if action.option_strings and action.nargs is None:
            self.valued.update(action.option_strings)
        return action

    def error(self, message: str) -> NoReturn:
        match = _CHOOSE_FROM.search(message)
        if match:
            allowed = ", ".join(c.strip().strip("'\"") for c in match.group(1).split(","))
            message = f"{message[: match.start()]}(allowed: {allowed})"
        elif self.commands and message.endswith("COMMAND"):
            message += f" (allowed: {', '.join(self.commands)})"
        raise UsageError(self.prog, message)

    def is_option(self, token: str) -> bool:
        """Whether ``token`` names one of this parser's options (or abbreviates one)."""
        if token == "--" or token.split("=", 1)[0] in self.options:
            return True
        if token.startswith("--"):
            stem = token.split("=", 1)[0]
            return any(option.startswith(stem) for option in self.options)
        return token[:2] in self.options


def _parser() -> _Parser:
    parser = _Parser(
        prog="autotune",
        description="Hardware-aware per-layer compression plans for PyTorch / Hugging Face models.",
        epilog="exit codes: 0 ok, 1 budget or tolerance broken, 2 bad input, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"autotune {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    _add_tune(sub)
    _add_validate(sub)
    _add_apply(sub)
    _add_export(sub)
    _add_profile(sub)
    _add_report(sub)
    _add_diff(sub)
    _add_targets(sub)
    parser.commands = dict(sub.choices)
    return parser


def _add_tune(sub: Any) -> None:
    tune = sub.add_parser("tune", help="find the best plan for a budget on a target")
    tune.add_argument("model", help=MODEL_HELP)
    tune.add_argument(
        "--budget",
        required=True,
        help="one word, e.g. 15MB, 8GiB, 4.5bits, 25%%, 20ms, decode=5ms or 8GB,20ms",
    )
    tune.add_argument("--target", default="local", help=TARGET_HELP)
    tune.add_argument("--target-file", action="append", default=[], help=TARGET_FILE_HELP)
    tune.add_argument("-o", "--output", help="write the plan JSON here")
    tune.add_argument("--save-model", metavar="DIR", help="also save the compressed model here")
    tune.add_argument(
        "--calibration", help="text file for calibration (default: stdlib docstrings)"
    )
    tune.add_argument(
        "--heldout", help="text file held out for validation (default: stdlib docstrings)"
    )
    tune.add_argument(
        "--seed", type=int, default=0, help="random seed of calibration sampling and search"
    )
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
    tune.add_argument(
        "--methods",
        help="comma-separated methods to search (default: rtn, plus w8a8 on CPU targets)",
    )
    tune.add_argument(
        "--runtime",
        default="torch",
        metavar="RUNTIME",
        help="what will run the plan: torch (autotune's modules, every option; default), vllm "
        "(GPU targets: options vLLM's kernels run from a compressed-tensors export) or "
        "onnxruntime (CPU targets: options an ONNX export holds)",
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
        default="end-to-end",
        metavar="ESTIMATOR",
        help="how each (layer, option) is scored, an estimator registered in "
        "autotune.estimators: end-to-end output error (cached), fisher or local (cheaper "
        "proxies)",
    )
    tune.add_argument(
        "--search",
        default="auto",
        metavar="ENGINE",
        help="engine that improves on the allocator's plan by whole-model evaluations, one "
        "registered in autotune.engines (allocator, evolution, tpe, nsga2) or auto: "
        "evolution up to 1B weights",
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
    _low_memory(tune)
    _common(tune)


def _add_validate(sub: Any) -> None:
    validate = sub.add_parser("validate", help="re-check a plan against a model (CI)")
    validate.add_argument("plan", help=PLAN_HELP)
    validate.add_argument("model", help=f"the model the plan was made for: {MODEL_HELP}")
    validate.add_argument(
        "--tolerance", type=float, default=0.10, help="relative error slack, at least 0"
    )
    validate.add_argument(
        "--heldout", help="held-out text file (if the plan was not tuned on stdlib text)"
    )
    validate.add_argument("--no-latency", action="store_true", help="do not time the model")
    validate.add_argument(
        "--compressed", metavar="DIR", help="check this saved compressed model (autotune apply -o)"
    )
    _low_memory(validate)
    _common(validate)


def _add_apply(sub: Any) -> None:
    apply = sub.add_parser("apply", help="apply a plan and save the compressed model")
    apply.add_argument("plan", help=PLAN_HELP)
    apply.add_argument("model", help=f"the model the plan was made for: {MODEL_HELP}")
    apply.add_argument(
        "-o", "--output", required=True, metavar="DIR", help="folder the compressed model goes to"
    )
    _low_memory(apply)
    _common(apply)


def _add_export(sub: Any) -> None:
    export = sub.add_parser(
        "export", help="write a plan's compressed model in a format another runtime loads"
    )
    export.add_argument("plan", help=PLAN_HELP)
    export.add_argument("model", help=f"the model the plan was made for: {MODEL_HELP}")
    export.add_argument(
        "--format",
        required=True,
        metavar="FORMAT",
        help="compressed-tensors (a folder transformers and vLLM load) or onnx (one file "
        "ONNX Runtime runs)",
    )
    export.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="PATH",
        help="where the export goes: a folder (compressed-tensors) or a file (onnx)",
    )
    _common(export)


def _add_profile(sub: Any) -> None:
    profile = sub.add_parser(
        "profile", help="sensitivity and cost tables of every layer and option"
    )
    profile.add_argument("model", help=MODEL_HELP)
    profile.add_argument("--target", default="local", help=TARGET_HELP)
    profile.add_argument("--target-file", action="append", default=[], help=TARGET_FILE_HELP)
    profile.add_argument(
        "--calibration", help="text file for calibration (default: stdlib docstrings)"
    )
    profile.add_argument(
        "--batch-size", type=int, default=1, help="batch size latency is judged at"
    )
    profile.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    profile.add_argument("--methods", help="comma-separated methods (default: as tune)")
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
        help="fit the target's roofline to latencies measured here; write the entry to FILE",
    )
    profile.add_argument("--cache-dir", help=CACHE_HELP)
    profile.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    _common(profile)


def _add_report(sub: Any) -> None:
    report = sub.add_parser(
        "report", help="a plan's report: text, or HTML and Markdown with figures"
    )
    report.add_argument("plan", help=PLAN_HELP)
    report.add_argument("-o", "--output", help="write OUTPUT.html, OUTPUT.md and OUTPUT_files/")
    report.add_argument("--json", action="store_true", help="machine-readable output")


def _add_diff(sub: Any) -> None:
    diff = sub.add_parser("diff", help="compare two plans (exit 0 same options, 1 different)")
    diff.add_argument("a", help="first plan JSON file")
    diff.add_argument("b", help="second plan JSON file")
    diff.add_argument("--json", action="store_true", help="machine-readable output")


def _add_targets(sub: Any) -> None:
    targets = sub.add_parser("targets", help="list the hardware registry, aliases included")
    targets.add_argument("--target-file", action="append", default=[], help=TARGET_FILE_HELP)
    targets.add_argument("--json", action="store_true", help="machine-readable output")


def _low_memory(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--low-memory",
        action="store_true",
        help="work block by block, reading one block's weights at a time, so that a model "
        "larger than memory can be handled (chosen by itself when the model's weights "
        "take more than a third of the memory available)",
    )


def _streams(args: argparse.Namespace) -> bool:
    """Whether to work block by block: asked for, or the model is too large for memory."""
    from autotune.streamed import too_large_for_memory

    if args.low_memory:
        return True
    reason = too_large_for_memory(args.model)
    if reason and not args.quiet:
        print(f"[autotune] {reason}: working block by block", file=sys.stderr)
    return reason is not None


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let transformers run the model's own code from its folder or cache",
    )


def _emit(args: argparse.Namespace, text: str, data: Any) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def _cmd_tune(args: argparse.Namespace) -> int:
    from autotune.budget import Budget
    from autotune.estimators import get_estimator
    from autotune.loading import load_model
    from autotune.runtimes import get_runtime
    from autotune.saved import save_compressed
    from autotune.searching import check_settings
    from autotune.targets import get_target
    from autotune.tuner import autotune

    budget = Budget.parse(
        args.budget,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        context=args.context,
        kv_dtype=args.kv_dtype,
    )
    target = get_target(args.target, args.target_file)  # fail fast on a bad target
    get_runtime(args.runtime).check_target(target, args.target)
    check_settings(args.search, args.max_evals, args.timeout, args.storage)
    get_estimator(args.sensitivity)  # registered engines and estimators, before any loading
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    labels = [o.strip() for o in args.options.split(",") if o.strip()] if args.options else None
    args.streamed = _streams(args)
    if args.streamed:
        return _tune_streamed(args, budget, target, methods, labels)
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    result = autotune(
        loaded.model,
        budget,
        target,
        calibration=args.calibration,
        heldout=args.heldout,
        tokenizer=loaded.tokenizer,
        seed=args.seed,
        methods=methods,
        option_labels=labels,
        inplace=False,
        progress=not args.quiet,
        measure=not args.no_measure,
        cache=False if args.no_cache else (args.cache_dir or True),
        sensitivity=args.sensitivity,
        search=args.search,
        max_evals=args.max_evals,
        timeout=args.timeout,
        storage=args.storage,
        study_name=args.study,
        structured={"ffn": args.prune_ffn, "heads": args.prune_heads},
        runtime=args.runtime,
    )
    result.plan.model["source"] = loaded.source
    if args.output:
        result.plan.save(args.output)
    if args.save_model:
        save_compressed(result.model, result.plan, args.save_model, loaded.tokenizer)
    text = result.report.layer_table() + "\n\n" + str(result.report)
    if args.output:
        text += f"\nplan written to {args.output}"
    if args.save_model:
        text += f"\ncompressed model written to {args.save_model} (autotune.load_compressed)"
    elif args.output:
        text += f"\nto save the compressed model: autotune apply {args.output} {args.model} -o DIR"
    if args.output:
        fmt = get_runtime(args.runtime).export_format
        if fmt is not None:
            text += (
                f"\nfor {args.runtime}: autotune export {args.output} {args.model} "
                f"--format {fmt} -o OUT"
            )
    _emit(args, text, result.plan.to_dict())
    holds = result.report.holds()
    return EXIT_OK if all(holds.values()) else EXIT_BROKEN


def _tune_streamed(
    args: argparse.Namespace, budget: Any, target: Any, methods: Any, labels: Any
) -> int:
    from autotune.errors import AutotuneError
    from autotune.streamed import tune_streamed

    unsupported = {
        "--search": args.search not in ("auto", "allocator"),
        "--sensitivity": args.sensitivity != "end-to-end",
        "--prune-ffn/--prune-heads": bool(args.prune_ffn or args.prune_heads),
        "--storage": args.storage is not None,
        "--runtime": args.runtime != "torch",
    }
    refused = [flag for flag, given in unsupported.items() if given]
    if refused:
        raise AutotuneError(
            f"{', '.join(refused)} need the whole model in memory; block by block a tune "
            "scores layers on their block's output and checks the allocator's plan against "
            "every uniform plan"
        )
    if not args.save_model:
        raise AutotuneError(
            "block by block, the compressed model is written as it is made: add --save-model DIR"
        )
    result = tune_streamed(
        args.model,
        budget,
        target,
        save_to=args.save_model,
        calibration=args.calibration,
        heldout=args.heldout,
        seed=args.seed,
        methods=methods,
        option_labels=labels,
        trust_remote_code=args.trust_remote_code,
        progress=not args.quiet,
    )
    if args.output:
        result.plan.save(args.output)
    text = result.report.layer_table() + "\n\n" + str(result.report)
    text += f"\ncompressed model written to {result.saved}"
    if args.output:
        text += f"\nplan written to {args.output}"
    _emit(args, text, result.plan.to_dict())
    return EXIT_OK if all(result.report.holds().values()) else EXIT_BROKEN


def _cmd_validate(args: argparse.Namespace) -> int:
    from autotune.plan import Plan
    from autotune.validate import validate_plan

    plan = Plan.load(args.plan)
    if args.tolerance < 0:
        from autotune.errors import AutotuneError

        raise AutotuneError(f"--tolerance must be at least 0, got {args.tolerance}")
    if _streams(args):
        from autotune.streamed import validate_streamed

        result = validate_streamed(
            plan,
            args.model,
            compressed=args.compressed,
            heldout=args.heldout,
            tolerance=args.tolerance,
            trust_remote_code=args.trust_remote_code,
        )
        _emit(args, str(result), result.to_dict())
        return EXIT_OK if result.ok else EXIT_BROKEN
    result = validate_plan(
        plan,
        args.model,
        heldout=args.heldout,
        tolerance=args.tolerance,
        measure_latency=not args.no_latency,
        trust_remote_code=args.trust_remote_code,
        compressed=args.compressed,
    )
    _emit(args, str(result), result.to_dict())
    return EXIT_OK if result.ok else EXIT_BROKEN


def _cmd_apply(args: argparse.Namespace) -> int:
    from autotune.apply import apply_plan
    from autotune.loading import load_model
    from autotune.plan import Plan
    from autotune.saved import save_compressed
    from profilers.measure import model_bytes

    plan = Plan.load(args.plan)
    if _streams(args):
        from autotune.streamed import apply_streamed, open_saved

        apply_streamed(args.model, plan, args.output, trust_remote_code=args.trust_remote_code)
        size = model_bytes(open_saved(args.output)[0].model)
        _emit(
            args,
            f"compressed model ({size:,} bytes) written block by block to {args.output}",
            {"output": args.output, "bytes": size},
        )
        return EXIT_OK
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    compressed = apply_plan(loaded.model, plan, tokenizer=loaded.tokenizer, inplace=True)
    save_compressed(compressed, plan, args.output, loaded.tokenizer)
    size = model_bytes(compressed)
    _emit(
        args,
        f"compressed model ({size:,} bytes) written to {args.output}",
        {"output": args.output, "bytes": size},
    )
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from autotune.export import export_plan
    from autotune.loading import load_model

    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    result = export_plan(
        args.plan, loaded.model, args.format, args.output, tokenizer=loaded.tokenizer
    )
    compressed = sum(1 for scheme in result.layers.values() if scheme != "float")
    _emit(
        args,
        f"{args.format}: {result.bytes:,} bytes written to {result.path} ({compressed} of "
        f"{len(result.layers)} layers compressed)",
        result.to_dict(),
    )
    return EXIT_OK


def _cmd_profile(args: argparse.Namespace) -> int:
    from autotune.estimators import get_estimator
    from autotune.io import write_text_atomic
    from autotune.loading import load_model
    from autotune.profiling import fitted_target_file, profile_model, write_profile
    from autotune.targets import get_target

    spec = get_target(args.target, args.target_file)
    get_estimator(args.sensitivity)
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    profile = profile_model(
        loaded.model,
        spec,
        tokenizer=loaded.tokenizer,
        calibration=args.calibration,
        methods=tuple(m.strip() for m in args.methods.split(",")) if args.methods else None,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        sensitivity=args.sensitivity,
        cache=False if args.no_cache else (args.cache_dir or True),
        fit=bool(args.fit_target),
        progress=not args.quiet,
    )
    text = profile.summary()
    if args.output:
        for path in write_profile(profile, args.output, args.csv):
            text += f"\nwrote {path}"
    if args.fit_target:
        write_text_atomic(args.fit_target, fitted_target_file(profile))
        text += f"\nwrote the fitted target entry to {args.fit_target} (use --target-file)"
    _emit(args, text, profile.to_dict())
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from autotune.plan import Plan
    from autotune.render import write_report
    from autotune.report import Report

    plan = Plan.load(args.plan)
    report = Report(plan)
    if args.output:
        written = write_report(plan, args.output)
        _emit(args, "\n".join(f"wrote {p}" for p in written), [str(p) for p in written])
    else:
        _emit(args, report.layer_table() + "\n\n" + str(report), report.to_dict())
    return EXIT_OK


def _cmd_diff(args: argparse.Namespace) -> int:
    from autotune.diff import diff_plans
    from autotune.plan import Plan

    result = diff_plans(Plan.load(args.a), Plan.load(args.b))
    _emit(args, str(result), result.to_dict())
    return EXIT_OK if result.identical else EXIT_BROKEN


def _cmd_targets(args: argparse.Namespace) -> int:
    from autotune.targets import aliases_by_target, load_registry

    specs, aliases = load_registry(args.target_file)
    named = aliases_by_target(specs, aliases)
    if args.json:
        print(
            json.dumps([s.to_dict() | {"aliases": named[s.name]} for s in specs.values()], indent=2)
        )
        return EXIT_OK
    rows = [
        ("name", "aliases", "kind", "memory", "bandwidth", "peak (dense)", "fast weight formats")
    ]
    for spec in specs.values():
        peaks = ", ".join(f"{k} {v / 1e12:.3g}T" for k, v in spec.peak_flops.items())
        rows.append(
            (
                spec.name,
                ", ".join(named[spec.name]) or "-",
                spec.kind,
                f"{spec.memory_bytes / 2**30:.0f} GiB",
                f"{spec.bandwidth / 1e9:.0f} GB/s",
                peaks,
                ", ".join(spec.kernels) or "-",
            )
        )
    rows.append(("local", "-", "probed", "-", "-", "measured on this machine when used", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
    return EXIT_OK


COMMANDS = {
    "tune": _cmd_tune,
    "validate": _cmd_validate,
    "apply": _cmd_apply,
    "profile": _cmd_profile,
    "report": _cmd_report,
    "diff": _cmd_diff,
    "targets": _cmd_targets,
    "export": _cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = _parse(parser, list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as exc:  # --help and --version, after printing
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"autotune: {_interrupted(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parse(parser: _Parser, argv: list[str]) -> argparse.Namespace:
    """The parsed command line; raises :class:`UsageError` on a malformed one."""
    argv = _attach_dash_values(parser, argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = parser.commands.get(getattr(args, "command", None) or "", parser)
        command.error(_split_budget(argv) or f"unrecognized arguments: {' '.join(extras)}")
    return args


def _attach_dash_values(parser: _Parser, argv: list[str]) -> list[str]:
    """``--budget -15MB`` as ``--budget=-15MB``: after an option that takes one value, a word
    that starts with '-' but is none of the command's options is that value (argparse would
    take it for an option and say the value is missing)."""
    start = next((i for i, token in enumerate(argv) if not token.startswith("-")), len(argv))
    command = parser.commands.get(argv[start]) if start < len(argv) else None
    if command is None:
        return argv
    out, rest = argv[: start + 1], iter(argv[start + 1 :])
    for token in rest:
        if token == "--":
            return [*out, token, *rest]
        value = next(rest, None) if token in command.valued else None
        if value is None:
            out.append(token)
        elif value.startswith("-") and not command.is_option(value):
            out.append(f"{token}={value}")
        else:
            out.extend([token, value])
    return out


def _split_budget(argv: list[str]) -> str | None:
    """The hint for ``--budget 15 MB``: a budget spread over several words."""
    for i, token in enumerate(argv):
        if token == "--budget" and i + 1 < len(argv):
            words, rest = [argv[i + 1]], argv[i + 2 :]
        elif token.startswith("--budget="):
            words, rest = [token.partition("=")[2]], argv[i + 1 :]
        else:
            continue
        for word in rest:
            if not _BUDGET_TEXT.fullmatch(" ".join([*words, word])):
                break
            words.append(word)
        if len(words) > 1:
            return (
                f"a budget is one word: --budget {''.join(words)} "
                f"(or quoted: --budget '{' '.join(words)}')"
            )
    return None


def _run(args: argparse.Namespace) -> int:
    """Run the command; bad input found on the way is one line on stderr and exit 2."""
    from autotune.errors import AutotuneError
    from methods.errors import OptionError

    try:
        return COMMANDS[args.command](args)
    except (AutotuneError, OptionError) as exc:
        print(f"autotune: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _interrupted(args: argparse.Namespace) -> str:
    """What an interrupt leaves behind, and how to go on from it."""
    if args.command not in ("tune", "profile"):
        return "interrupted"
    notes = [_cache_note(args)]
    if getattr(args, "storage", None):
        notes.append(f"the search's trials are kept in {args.storage}, so its study resumes too")
    return "; ".join(["interrupted", *notes])


def _cache_note(args: argparse.Namespace) -> str:
    """Whether finished sensitivity measurements were kept, and where."""
    why = _not_cached_because(args)
    if why:
        return f"sensitivity measurements are not cached ({why}): running again measures anew"
    from profilers.cache import default_cache_dir

    folder = args.cache_dir or default_cache_dir()
    return (
        f"finished sensitivity measurements are cached in {folder}; running the same command "
        "again resumes from them"
    )


def _not_cached_because(args: argparse.Namespace) -> str | None:
    if args.no_cache:
        return "--no-cache"
    if args.sensitivity != "end-to-end":
        return f"--sensitivity {args.sensitivity}"
    if getattr(args, "streamed", False):
        return "block by block"
    return None


if __name__ == "__main__":
    sys.exit(main())
