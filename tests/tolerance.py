"""Numerical tolerances derived from fp32 precision (see tests/README.md, "Tolerances").

Two fp32 evaluations of the same quantity differ when they sum in another order: a different BLAS kernel
(which one runs depends on the CPU), logits computed at fewer rows, SDPA with or without an explicit
mask, a padded vs an unpadded batch. The difference is rounding noise, and its size is predictable:

* one dot product of length ``n`` whose terms have absolute sum ``S`` is off by at most ``n·ε·S`` and in
  practice by ``~√n·ε·S`` (rounding errors are a random walk), with ``ε = 2⁻²³ ≈ 1.19e-7``;
* a network of depth ``L`` carries such an error through each layer; normalisation keeps it from growing
  geometrically, so it grows about linearly in ``L``.

Hence the rule every parity test follows::

    atol = safety · ε · √width · depth · scale

where ``scale`` is the magnitude of the compared values (``max |reference|``; for log-probs the
magnitude of the *logits*, since ``log_softmax`` passes a logit's absolute error through unchanged),
``width`` the length of the longest reduction (hidden or vocabulary size), ``depth`` the number of layers
whose kernels may differ between the two paths (1 when only the LM head runs differently), and
``safety`` a small constant (default 4). ``scale`` is clamped below at 1. Log-probs add the
log-sum-exp's own rounding, ``safety · ε · √V`` (:func:`logprob_atol`). Where exactness is the point (a closed form), compare against a
float64 reference instead.
"""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

__all__ = ["EPS32", "fp32_atol", "logprob_atol", "assert_fp32_close"]

EPS32 = torch.finfo(torch.float32).eps  # 2**-23


def fp32_atol(scale: float, width: int, depth: int = 1, safety: float = 4.0) -> float:
    """Absolute tolerance for comparing two fp32 computations of values of magnitude ``scale``."""
    if scale < 0 or width < 1 or depth < 1:
        raise ValueError("scale >= 0, width >= 1 and depth >= 1")
    return safety * EPS32 * math.sqrt(width) * depth * max(float(scale), 1.0)


def logprob_atol(logit_scale: float, width: int, vocab: int, depth: int = 1, safety: float = 4.0) -> float:
    """Tolerance for log-probs: the logits' error (:func:`fp32_atol` at the logits' magnitude) plus the
    log-sum-exp over ``vocab`` terms (relative error ``~√V·ε`` of the sum, i.e. an absolute error in log)."""
    return fp32_atol(logit_scale, width, depth, safety) + safety * EPS32 * math.sqrt(vocab)


def assert_fp32_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    width: int,
    depth: int = 1,
    scale: float | None = None,
    safety: float = 4.0,
    vocab: int | None = None,
) -> None:
    """``assert_close`` with the fp32-derived absolute tolerance (``rtol=0``).

    Args:
        width: the longest reduction involved (hidden size, or vocabulary size for a softmax over it).
        depth: layers whose kernels may differ between the two computations.
        scale: magnitude of the values (default ``max |expected|``); pass the logits' magnitude when
            comparing log-probs.
        vocab: for log-probs, the vocabulary size (adds the log-sum-exp term of :func:`logprob_atol`).
    """
    s = float(expected.detach().abs().max()) if scale is None else float(scale)
    atol = fp32_atol(s, width, depth, safety) + (safety * EPS32 * math.sqrt(vocab) if vocab else 0.0)
    assert_close(actual, expected, atol=atol, rtol=0)
