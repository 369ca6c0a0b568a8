"""Quadrature rules on [0, 1] for path integrals (integrated gradients, integrated Jacobians).

Pure functions: ``nodes, weights = quadrature(n, rule)`` with ``Σ w_k g(α_k) ≈ ∫₀¹ g(α) dα``.

- ``"gausslegendre"``: n-point Gauss-Legendre, exact for polynomials of degree ≤ 2n − 1; the default, since
  the IG integrand along a straight path is smooth and converges much faster than Riemann sums.
- ``"riemann_left" | "riemann_right" | "riemann_middle" | "riemann_trapezoid"``: the Riemann rules Captum
  offers (``left``: α_k = k/n, ``right``: (k+1)/n, ``middle``: (k+½)/n, all with weight 1/n; trapezoid:
  α_k = k/(n−1), end weights halved).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["RULES", "quadrature"]

RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def quadrature(n: int, rule: str = "gausslegendre", dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``α`` and weights ``w`` (each ``[n]``) of a rule on [0, 1]; ``w.sum() == 1``.

    Examples:
        >>> a, w = quadrature(3)
        >>> round(float((w * a**5).sum()), 12) == round(1 / 6, 12)   # degree 5 = 2n - 1 is exact
        True
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n_steps must be a positive int, got {n!r}")
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        a, wt = (x + 1) / 2, w / 2
    elif rule == "riemann_left":
        a, wt = np.arange(n) / n, np.full(n, 1 / n)
    elif rule == "riemann_right":
        a, wt = (np.arange(n) + 1) / n, np.full(n, 1 / n)
    elif rule == "riemann_middle":
        a, wt = (np.arange(n) + 0.5) / n, np.full(n, 1 / n)
    elif rule == "riemann_trapezoid":
        if n < 2:
            raise ValueError("the trapezoid rule needs n_steps >= 2")
        a = np.linspace(0.0, 1.0, n)
        wt = np.full(n, 1 / (n - 1))
        wt[0] = wt[-1] = 0.5 / (n - 1)
    else:
        raise ValueError(f"unknown quadrature rule {rule!r}; choose one of {RULES}")
    return torch.tensor(a, dtype=dtype), torch.tensor(wt, dtype=dtype)
