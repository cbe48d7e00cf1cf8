"""``autotune profile``: sensitivity and cost tables of every layer and option."""

from __future__ import annotations

import argparse

from autotune.cli.commands.output import emit
from autotune.cli.exit_codes import EXIT_OK


def cmd_profile(args: argparse.Namespace) -> int:
    """Profile the model on the target; write the tables and a fitted target if asked."""
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
        runtime=args.runtime,
    )
    text = profile.summary()
    if args.output:
        for path in write_profile(profile, args.output, args.csv):
            text += f"\nwrote {path}"
    if args.fit_target:
        write_text_atomic(args.fit_target, fitted_target_file(profile))
        text += f"\nwrote the fitted target entry to {args.fit_target} (use --target-file)"
    emit(args, text, profile.to_dict())
    return EXIT_OK
