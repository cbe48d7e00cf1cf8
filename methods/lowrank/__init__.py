"""Low-rank factorisation of linear layers: ``W ~ B A`` with ``A`` [rank, cols], ``B`` [rows, rank].

Three methods share one option type and one storage layout:

* ``svd``: the truncated SVD of ``W``, the best rank-``r`` approximation in Frobenius norm
  (Eckart–Young). No calibration.
* ``whitened_svd``: activation-aware, as in SVD-LLM. It minimises ``||X W^T - X (B A)^T||_F``
  over calibration inputs ``X``: with ``S`` the lower Cholesky factor of the dampened second
  moment ``H = 2 X^T X / n + d I`` (``d`` a fraction of the mean diagonal, raised while the
  factorisation fails), ``||X E^T||_F^2 ~ ||E S||_F^2``, so the optimum is the truncated SVD
  ``U_r Σ_r V_r^T`` of ``W S`` with ``S^-1`` applied on the right: ``A = Σ_r^½ V_r^T S^-1``
  (a triangular solve, no inverse), ``B = U_r Σ_r^½``.
* ``fisher_svd``: Fisher-weighted SVD (FWSVD, Hsu et al. 2022). Row ``i`` of ``W`` gets the
  importance ``I_i = sqrt(sum_j F_ij)`` from the weight's diagonal Fisher information ``F``;
  the truncated SVD of ``diag(I) W`` is unscaled on the left: ``B = diag(I)^-1 U_r Σ_r^½``.
  Rows whose importance is zero get a small floor.

Each component's scale is split evenly between the factors (``Σ^½`` on either side, then
each column of ``B`` and row of ``A`` brought to equal norms), so both factors have similar
ranges before they are stored: float16 (``bits=16``) or RTN integer codes (8 or 4 bits,
symmetric, one scale per row or per group along the row). Integer factors always run
dequantised (two float matmuls), the ``dequantize`` format: the CPU kernels would run once
per factor, a path no runtime format names.
"""

from methods.lowrank.factorisations import (
    DAMP,
    FISHER_FLOOR,
    balance,
    damped_cholesky,
    fisher_factors,
    row_importance,
    truncated_svd,
    whitened_factors,
)
from methods.lowrank.method import LowRank
from methods.lowrank.modules import Float16Factor, LowRankLinear, QuantizedFactor
from methods.lowrank.observer import FisherObserver
from methods.lowrank.options import (
    ALLOWED_BITS,
    GRID,
    FisherSVDOption,
    LowRankOption,
    WhitenedSVDOption,
    factor_shapes,
)
from methods.lowrank.variants import FisherSVD, PlainSVD, WhitenedSVD

__all__ = [
    "ALLOWED_BITS",
    "DAMP",
    "FISHER_FLOOR",
    "GRID",
    "FisherObserver",
    "FisherSVD",
    "FisherSVDOption",
    "Float16Factor",
    "LowRank",
    "LowRankLinear",
    "LowRankOption",
    "PlainSVD",
    "QuantizedFactor",
    "WhitenedSVD",
    "WhitenedSVDOption",
    "balance",
    "damped_cholesky",
    "factor_shapes",
    "fisher_factors",
    "row_importance",
    "truncated_svd",
    "whitened_factors",
]
