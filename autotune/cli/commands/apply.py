"""``autotune apply``: apply a plan and save the compressed model."""

from __future__ import annotations

import argparse

from autotune.cli.commands.output import emit
from autotune.cli.commands.streaming import streams
from autotune.cli.exit_codes import EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    """Compress the model by the plan and save it, block by block if need be."""
    from autotune.apply import apply_plan
    from autotune.loading import load_model
    from autotune.plan import Plan
    from autotune.saved import save_compressed
    from profilers.measure import model_bytes

    plan = Plan.load(args.plan)
    if streams(args):
        from autotune.streamed import apply_streamed, open_saved

        apply_streamed(args.model, plan, args.output, trust_remote_code=args.trust_remote_code)
        size = model_bytes(open_saved(args.output)[0].model)
        emit(
            args,
            f"compressed model ({size:,} bytes) written block by block to {args.output}",
            {"output": args.output, "bytes": size},
        )
        return EXIT_OK
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    compressed = apply_plan(loaded.model, plan, tokenizer=loaded.tokenizer, inplace=True)
    save_compressed(compressed, plan, args.output, loaded.tokenizer)
    size = model_bytes(compressed)
    emit(
        args,
        f"compressed model ({size:,} bytes) written to {args.output}",
        {"output": args.output, "bytes": size},
    )
    return EXIT_OK
