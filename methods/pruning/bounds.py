"""The error bound of pruning on Gaussian weights and inputs."""

from __future__ import annotations

import math
from functools import cache

from scipy import integrate, stats

from methods.pruning.options import PruneOption

# The error bound is this multiple of the expected error (as the default quantiser rule is,
# about 1.5x): room for the spread of a few-token measurement and of the Gaussian weights.
BOUND_MARGIN = 1.5


@cache
def pruned_energy(group: int, pruned: int) -> float:
    """Expected fraction of the energy ``sum w^2`` of ``group`` i.i.d. standard Gaussians held
    by the ``pruned`` smallest in magnitude.

    The densities of the 1st..p-th order statistics of ``|w|`` (density ``f = 2 phi``, cdf
    ``F = 2 Phi - 1``) sum to ``group * f(x) * P(Binomial(group - 1, F(x)) <= p - 1)``, so the
    fraction is ``int_0^inf x^2 f(x) P(Binomial(group - 1, F(x)) <= p - 1) dx``. For large
    groups it tends to ``(2 Phi(t) - 1) - 2 t phi(t)``, ``t`` the ``p / group`` quantile of
    ``|w|`` (0.0713 at 50%); half of a block of 64 holds 0.0755, 2 of 4 hold 0.1324 and 4 of 8
    hold 0.1033: N:M removes more than unstructured pruning of the same sparsity.
    """

    def integrand(x: float) -> float:
        below = stats.binom.cdf(pruned - 1, group - 1, 2.0 * stats.norm.cdf(x) - 1.0)
        return x * x * 2.0 * stats.norm.pdf(x) * below

    return float(integrate.quad(integrand, 0.0, math.inf)[0])


def prune_error_bound(option: PruneOption) -> float:
    """Bound on the relative output error for i.i.d. Gaussian weights and inputs.

    With inputs of identity covariance the output error's energy is the removed and perturbed
    weights' energy. Pruning removes the fraction :func:`pruned_energy` (over each M-group for
    N:M, each block otherwise); the expected relative error is its square root. Quantised kept
    values add, in quadrature, the default rule of a uniform quantiser (``3 * 2**-bits``, itself
    about 1.5x the expected error) over the kept fraction of the weights, whose range is the
    whole block's. Magnitude pruning is the best mask for such inputs; Wanda's and SparseGPT's
    scores reduce to it in expectation. The pruning part is taken with :data:`BOUND_MARGIN`.
    """
    nm = option.nm
    group, kept = (nm[1], nm[0]) if nm is not None else (option.block, option.keep)
    removed = pruned_energy(group, group - kept)
    quant = 3.0 * 2.0**-option.bits * math.sqrt(kept / group)
    return max(math.sqrt((BOUND_MARGIN**2) * removed + quant**2), 0.01)
