"""Training losses of DRDM (paper Algorithm 1), as the reference computes them.

Notation: ``b = psi_t`` (label, one forward step), ``psi_hat`` the network's K=2 estimate,
``a(x) = psi_hat(x + b(x))``.  All fields here are in the reference units (fraction of S),
because the scalings and epsilons below were tuned for them.

* ``dist``: mean over pixels of ||100 a + 100 b||^2 / (||100 b||^2 + 1e-3), zero for a perfect inverse;
* ``ang``: mean cosine between a and b (scaled by 1e5, eps 1e-4), minimised towards -1;
* ``reg_l1``: L1 of forward differences of psi_hat with a 1e-4 dead zone, averaged over axes;
* ``reg_negdetj_weighted``: the reference's "negative Jacobian" term, 2 * mean relu(-P) with a
  pseudo-determinant P built without the identity; known to be numerically inert (~1e-7);
* ``true_negdet``: the project's switchable improvement, mean relu(-det(I + grad(S psi_hat))).
"""
from __future__ import annotations

from typing import Dict

import torch

from .spatial import frac_to_px, warp

__all__ = ["dist_loss", "ang_loss", "reg_l1", "pseudo_det", "reg_negdetj", "true_negdet",
           "drdm_losses"]


def dist_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = 100 * a, 100 * b
    return torch.mean(torch.sum((a + b) ** 2, dim=1) / (torch.sum(b ** 2, dim=1) + 1e-3))


def ang_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = 1e5 * a, 1e5 * b
    num = torch.sum(a * b, dim=1)
    den = torch.sqrt(torch.sum(a ** 2, dim=1) * torch.sum(b ** 2, dim=1) + 1e-4)
    return torch.mean(num / den)


def reg_l1(psi: torch.Tensor) -> torch.Tensor:
    nd = psi.dim() - 2
    total = 0
    for k in range(nd):
        total = total + torch.mean(torch.relu(torch.abs(torch.diff(psi, dim=2 + k)) - 1e-4))
    return total / nd


def _bwd(psi, axis):
    d = torch.diff(psi, dim=axis)
    pad = [0, 0] * (psi.dim() - axis - 1) + [1, 0]
    return torch.nn.functional.pad(d, pad)


def _fwd(psi, axis):
    d = torch.diff(psi, dim=axis)
    pad = [0, 0] * (psi.dim() - axis - 1) + [0, 1]
    return torch.nn.functional.pad(d, pad)


def pseudo_det(psi: torch.Tensor) -> torch.Tensor:
    """The reference's pseudo-determinant P (no identity, mixed differences), (B, *spatial)."""
    nd = psi.dim() - 2
    B0, F0 = _bwd(psi, 2), _fwd(psi, 2)
    if nd == 2:
        return B0[:, 0] * F0[:, 1] - B0[:, 1] * F0[:, 0]
    B1 = _bwd(psi, 3)
    return (B0[:, 0] * F0[:, 1] * B1[:, 2] + B0[:, 1] * F0[:, 2] * B1[:, 0] + B0[:, 2] * F0[:, 0] * B1[:, 1]
            - B0[:, 2] * F0[:, 1] * B1[:, 0] - B0[:, 0] * F0[:, 2] * B1[:, 1] - B0[:, 1] * F0[:, 0] * B1[:, 2])


def reg_negdetj(psi: torch.Tensor) -> torch.Tensor:
    return 2 * torch.mean(torch.relu(-pseudo_det(psi)))


def true_negdet(psi: torch.Tensor) -> torch.Tensor:
    """mean relu(-det(I + grad(S psi))) with central differences (one-sided at borders)."""
    nd = psi.dim() - 2
    S = psi.shape[2]
    u = psi * S
    grads = torch.gradient(u, dim=list(range(2, 2 + nd)))  # list over axes k: (B, d, ...)
    J = [[grads[k][:, c] + (1.0 if c == k else 0.0) for k in range(nd)] for c in range(nd)]
    if nd == 2:
        det = J[0][0] * J[1][1] - J[0][1] * J[1][0]
    else:
        det = (J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1])
               - J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0])
               + J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0]))
    return torch.mean(torch.relu(-det))


def drdm_losses(psi_hat: torch.Tensor, psi_t: torch.Tensor, padding: str = "zeros",
                w_dist: float = 1.0, w_ang: float = 1.0, w_reg: float = 10.0,
                w_true_negdet: float = 0.0) -> Dict[str, torch.Tensor]:
    """All loss terms and the total for fraction-of-S fields (B, d, S...)."""
    S = psi_t.shape[2]
    a = warp(psi_hat, frac_to_px(psi_t, S), "linear", padding)
    out = {"dist": dist_loss(a, psi_t), "ang": ang_loss(a, psi_t), "reg_l1": reg_l1(psi_hat),
           "reg_negdetj_weighted": reg_negdetj(psi_hat)}
    out["reg"] = out["reg_l1"] + out["reg_negdetj_weighted"]
    total = (w_dist * out["dist"] + w_ang * out["ang"]) + w_reg * out["reg"]
    if w_true_negdet:
        out["true_negdet"] = true_negdet(psi_hat)
        total = total + w_true_negdet * out["true_negdet"]
    out["total"] = total
    return out
