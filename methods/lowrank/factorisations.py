"""The factorisations: ``(B, A)`` with ``W ~ B A`` for each low-rank method's metric."""

from __future__ import annotations

import torch

from methods.errors import OptionError

DAMP = 0.01  # fraction of the mean Hessian diagonal added before the Cholesky factorisation
_MAX_DAMP_RETRIES = 4
FISHER_FLOOR = 1e-3  # smallest row importance, relative to the mean importance


def truncated_svd(
    matrix: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_r Σ_r^½`` ([m, r]), ``Σ_r^½ V_r^T`` ([r, n]) and all singular values."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank], s


def balance(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale column ``k`` of ``left`` and row ``k`` of ``right`` to equal norms (their
    product is unchanged); components that are zero on either side stay as they are."""
    left_norm, right_norm = left.norm(dim=0), right.norm(dim=1)
    ok = (left_norm > 0) & (right_norm > 0)
    ratio = torch.where(ok, right_norm / torch.where(ok, left_norm, 1.0), 1.0)
    d = ratio.sqrt()
    return left * d, right / d[:, None]


def damped_cholesky(hessian: torch.Tensor, damp: float, label: str) -> torch.Tensor:
    """Lower Cholesky factor of ``H + d I``, ``d = damp * mean(diag H)``, raising ``damp``
    while the factorisation fails (all-zero inputs: ``d = damp``)."""
    mean_diag = float(hessian.diagonal().mean())
    scale = mean_diag if mean_diag > 0 else 1.0
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damps = [damp] + [max(damp, 0.01) * 10.0**k for k in range(1, _MAX_DAMP_RETRIES)]
    for fraction in damps:
        lower, info = torch.linalg.cholesky_ex(hessian + (fraction * scale) * eye)
        if int(info) == 0 and torch.isfinite(lower.diagonal()).all():
            return lower
    raise OptionError(
        f"{label}: the calibration second moment is not positive definite even with "
        f"dampening {damps[-1]:g}; use more (or more varied) calibration data"
    )


def whitened_factors(
    weight: torch.Tensor, hessian: torch.Tensor, rank: int, damp: float = DAMP, label: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` minimising ``tr((W - B A) H (W - B A)^T)`` for the dampened ``H``."""
    lower = damped_cholesky(hessian, damp, label)
    left, right = truncated_svd(weight @ lower, rank)[:2]
    # A S = Σ^½ V^T: solve for A against the triangular S
    return left, torch.linalg.solve_triangular(lower, right, upper=False, left=False)


def row_importance(fisher: torch.Tensor) -> torch.Tensor:
    """``I_i = sqrt(sum_j F_ij)``, floored at ``FISHER_FLOOR`` times its mean (all ones when
    the Fisher information is zero everywhere)."""
    importance = fisher.sum(dim=1).clamp_min(0).sqrt()
    mean = float(importance.mean())
    if not mean > 0:
        return torch.ones_like(importance)
    return importance.clamp_min(FISHER_FLOOR * mean)


def fisher_factors(
    weight: torch.Tensor, fisher: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of the truncated SVD of ``diag(I) W``, unscaled on the left."""
    importance = row_importance(fisher.to(weight.dtype))
    left, right = truncated_svd(importance[:, None] * weight, rank)[:2]
    return left / importance[:, None], right
