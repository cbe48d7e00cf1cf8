"""The tune as named stages, each a function with typed inputs and outputs.

``autotune()`` (:mod:`autotune.tuner`) runs them in order:

1. :func:`~autotune.pipeline.prepare.prepare`: load the model, parse the budget, resolve
   target and runtime, and answer from layer shapes what needs no data;
2. :func:`~autotune.pipeline.prepare.calibrate`: the calibration, sensitivity, selection and
   held-out splits, their reference outputs, and any structured pruning;
3. :func:`~autotune.pipeline.price.price`: the layers and their options, each priced in
   bytes and latency, and the budget's limits;
4. :func:`~autotune.pipeline.choose.score`: each (layer, option) scored by the estimator,
   then :func:`~autotune.pipeline.price.guard`: a memory budget's decode limit from the
   scores, where the runtime holds generation to a reference (:mod:`autotune.decode_guard`);
5. :func:`~autotune.pipeline.choose.search`: the allocator's plan, improved by the engine;
6. :func:`~autotune.pipeline.choose.select_plan`: the front runner against every uniform
   plan that fits, on the selection split;
7. :func:`~autotune.pipeline.record.apply_chosen` and
   :func:`~autotune.pipeline.record.record_plan`: the plan applied and written down, in one
   place;
8. :func:`~autotune.pipeline.record.measure_result`: measured figures, on held-out data only.
"""
