"""Helpers for users' own test suites.

```python
from autotune.testing import assert_plan_holds

def test_compression_plan_still_holds():
    assert_plan_holds("demo", "plans/plan.json", tolerance=0.1)
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from autotune.plan import Plan
from autotune.validate import ValidationResult, validate_plan


def assert_plan_holds(
    model: nn.Module | str | Path,
    plan: Plan | str | Path,
    *,
    tolerance: float = 0.10,
    tokenizer: Any = None,
    heldout: Any = None,
    compressed: str | Path | None = None,
    measure_latency: bool = True,
) -> ValidationResult:
    """Fail with a readable message, one line per broken figure, unless ``plan`` still holds
    for ``model``: budget, predicted bytes within 0.5%, held-out error within ``tolerance``.
    With ``compressed`` (a folder written by ``autotune apply``), that saved model is checked
    instead of re-applying the plan."""
    __tracebackhide__ = True
    result = validate_plan(
        plan,
        model,
        tokenizer=tokenizer,
        heldout=heldout,
        tolerance=tolerance,
        measure_latency=measure_latency,
        compressed=compressed,
    )
    if not result.ok:
        name = plan if isinstance(plan, (str, Path)) else "the plan"
        lines = [f"{name} no longer holds:"]
        lines += [
            f"  {c.name}: measured {c.measured}, expected {c.expected}"
            + (f" ({c.note})" if c.note else "")
            for c in result.failures()
        ]
        raise AssertionError("\n".join(lines))
    return result
