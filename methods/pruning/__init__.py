"""Weight pruning of linear layers: magnitude, Wanda and SparseGPT, optionally with quantised
kept values, stored as :class:`methods.sparse.SparseLinear`.

Sparsity patterns (the same for the three methods, so that bytes depend on the shape only):

* unstructured (``pattern=None``): every row keeps exactly ``block - round(sparsity * block)``
  of each block of ``block`` consecutive input columns (Python's ``round``);
* N:M (``pattern="2:4"``, ``"4:8"``, ...): every row keeps N of every M consecutive input
  columns; ``sparsity`` must then be ``1 - N/M`` and ``block`` a multiple of M (the group of
  the quantisation scales, and SparseGPT's block).

Methods, each choosing the kept weights of a row within each block (or M-group) by a score:

* ``magnitude``: ``|W_ij|``; no calibration.
* ``wanda`` (Sun et al., 2023): ``|W_ij| * ||X_j||_2``, ``X_j`` the calibration activations
  of input channel ``j`` (its observer sums their squares).
* ``sparsegpt`` (Frantar & Alistarh, 2023): optimal brain surgeon pruning through the inverse
  Hessian ``H^-1`` of the layer's inputs (``H = 2 X^T X / n``, dampened), swept column by
  column as in GPTQ (:mod:`methods.gptq`, whose observer, Cholesky factor and column quantiser
  it uses): pruning (or rounding) column ``j`` by ``e`` spreads ``-e / U_jj * U_j,j+1:`` onto
  the columns not yet swept, ``U = chol(H^-1)`` upper. The mask of each block of ``block``
  columns is chosen when the sweep reaches the block (adaptive mask selection) by the OBS
  saliency ``w^2 / U_jj^2`` of the *updated* weights (``U_jj^2`` is the inverse Hessian's
  diagonal over the columns left); for N:M the kept set of each M-group is chosen when the
  sweep reaches the group, as in the paper.

Order of application: choose the mask -> (SparseGPT: weight update) -> quantise the kept values.
With ``bits`` in 2..8 the kept values of each row and block get ``bits``-bit codes with a
float16 scale (and offset unless ``symmetric``) fitted on the kept values only: magnitude and
Wanda prune, then round the kept values to nearest; SparseGPT quantises jointly (as GPTQ does):
it fits a block's scales on its kept, updated values when the sweep reaches the block (as a
pruning-only pass over the block leaves them) and spreads each column's pruning *and* rounding
error onto the columns left.

SparseGPT's Hessian is first shrunk towards its mean diagonal by an intensity estimated from the
calibration data (:func:`shrink_hessian`), on top of the paper's 1% dampening: with few tokens
per input, or nearly isotropic inputs, OBS fits the calibration tokens rather than the layer,
and the shrinkage makes it fall back to magnitude pruning there.
"""

from methods.pruning.bounds import BOUND_MARGIN, prune_error_bound, pruned_energy
from methods.pruning.masks import score_mask, top_mask
from methods.pruning.method import GRID, SPARSEGPT_GRID, PruningMethod, grid_block
from methods.pruning.options import (
    ALLOWED_BITS,
    MAX_M,
    MagnitudeOption,
    PruneOption,
    SparseGPTOption,
    WandaOption,
    check_prune_option,
    parse_pattern,
)
from methods.pruning.sparsegpt import (
    DAMP,
    LAZY,
    SweepResult,
    shrink_hessian,
    shrinkage,
    sparsegpt_prune,
)
from methods.pruning.variants import Magnitude, SparseGPT, Wanda

__all__ = [
    "ALLOWED_BITS",
    "BOUND_MARGIN",
    "DAMP",
    "GRID",
    "LAZY",
    "MAX_M",
    "SPARSEGPT_GRID",
    "Magnitude",
    "MagnitudeOption",
    "PruneOption",
    "PruningMethod",
    "SparseGPT",
    "SparseGPTOption",
    "SweepResult",
    "Wanda",
    "WandaOption",
    "check_prune_option",
    "grid_block",
    "parse_pattern",
    "prune_error_bound",
    "pruned_energy",
    "score_mask",
    "shrink_hessian",
    "shrinkage",
    "sparsegpt_prune",
    "top_mask",
]
