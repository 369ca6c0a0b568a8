"""Token merging (METHODS.md PRN-1, PRN-8, PRN-10): ToMe bipartite merging, Y = W·X transforms, cluster pooling,
and ToMe on BERT-style encoders.

Pure functions over tensors:

- :func:`bipartite_merge`: ToMe's bipartite soft matching (Bolya et al. 2023, "Token Merging: Your ViT But
  Faster"), reimplemented from the paper, batched, padding- and protection-aware, size-tracking;
- :func:`unmerge`, :func:`proportional_attention_bias`, :func:`size_weighted_mean`;
- PRN-1 "every reduction is Y = W·X" (FiCoCo; Token Transforming): :func:`transform_tokens` with
  :func:`W_prune`, :func:`W_merge`, :func:`W_soft`, :func:`W_pool`;
- PRN-10 :func:`cluster_pool` (Token Pooling in ViTs, Marin et al. 2023): weighted k-means.

Model-aware: :func:`tome_encoder` merges tokens inside a (non-causal) encoder's forward, physically (the tensors
that later layers process are shorter), with proportional attention, and unmerges the last layer's output so
pooling code keeps working.

**Conventions.** ``valid`` ``[B, T]`` marks real tokens (pads are never merged and get size 0 by default);
``sizes`` ``[B, T]`` counts how many original tokens each token stands for; ``assignment`` ``[B, T]`` gives, for
each *original* token, the index of the output token it went to, so ``unmerge(y, assignment)`` broadcasts a
merged sequence back to the original length. Outputs keep the original order (sorted by the position of the
surviving token).
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

from tokensmith.pruning.report import ReductionReport

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "MergeResult",
    "Transformed",
    "ClusterResult",
    "MergeReport",
    "bipartite_merge",
    "mergeable_counts",
    "unmerge",
    "proportional_attention_bias",
    "size_weighted_mean",
    "transform_tokens",
    "W_prune",
    "W_merge",
    "W_soft",
    "W_pool",
    "cluster_pool",
    "tome_encoder",
]


# ---------------------------------------------------------------------------------------------- helpers
def _check_x(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, T, d], got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(
            f"{name} must be [B, T, d] (add a batch axis with x[None]); got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _mask_arg(
    m: torch.Tensor | None, B: int, T: int, name: str, device: torch.device, default: bool
) -> torch.Tensor:
    if m is None:
        return torch.full((B, T), default, dtype=torch.bool, device=device)
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a [B, T] boolean tensor or None, got {type(m).__name__}")
    if tuple(m.shape) != (B, T):
        raise ValueError(f"{name} must be [B, T] = {(B, T)}; got {tuple(m.shape)}")
    return m.to(device=device, dtype=torch.bool)


def _real_ranks(valid: torch.Tensor) -> torch.Tensor:
    """Rank of each real token among the real tokens of its row (0, 1, 2, ...); pads get -1."""
    return torch.where(valid, valid.long().cumsum(-1) - 1, torch.full_like(valid, -1, dtype=torch.long))


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b, i]]`` for ``x`` ``[B, T, ...]`` and ``idx`` ``[B, N]``."""
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


def mergeable_counts(valid: torch.Tensor, protect: torch.Tensor | None = None) -> torch.Tensor:
    """The largest ``r`` :func:`bipartite_merge` accepts per row, ``[B]``.

    ``r_max = min(⌊n/2⌋, |A \\ P|)`` when at least one unprotected B token exists, else 0, where ``n`` is the
    row's real-token count, A (B) its real tokens of even (odd) rank and P the protected tokens.

    Examples:
        >>> import torch
        >>> v = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
        >>> mergeable_counts(v).tolist()
        [2, 1]
    """
    valid = valid.bool()
    protect = torch.zeros_like(valid) if protect is None else protect.bool().to(valid.device)
    rank = _real_ranks(valid)
    free = valid & ~protect
    n_a = (free & (rank % 2 == 0)).sum(-1)
    n_b = (free & (rank % 2 == 1)).sum(-1)
    r = torch.minimum(valid.sum(-1) // 2, n_a)
    return torch.where(n_b > 0, r, torch.zeros_like(r))


# ---------------------------------------------------------------------------------------------- ToMe
@dataclass(frozen=True)
class MergeResult:
    """What :func:`bipartite_merge` (or :func:`cluster_pool`) returns.

    Attributes:
        x: ``[B, L, d]`` merged tokens, in original order.
        sizes: ``[B, L]`` original tokens each output token stands for (0 for pad slots).
        assignment: ``[B, T]`` index in ``0..L-1`` of the output token each original token went to.
        kept_columns: ``[B, L]`` the original column of each output slot (the surviving token).
        valid: ``[B, L]`` real output tokens (False for pads).

    Examples:
        >>> import torch
        >>> res = bipartite_merge(torch.tensor([[[1.0], [1.0], [-1.0], [2.0]]]), r=1)
        >>> res.kept_columns.tolist(), res.valid.tolist()
        ([[1, 2, 3]], [[True, True, True]])
    """

    x: torch.Tensor
    sizes: torch.Tensor
    assignment: torch.Tensor
    kept_columns: torch.Tensor
    valid: torch.Tensor


def bipartite_merge(
    x: torch.Tensor,
    r: int | torch.Tensor,
    metric: torch.Tensor | None = None,
    sizes: torch.Tensor | None = None,
    protect: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> MergeResult:
    r"""ToMe bipartite soft matching: merge ``r`` tokens of each row into their most similar partner.

    From Bolya et al. 2023, "Token Merging: Your ViT But Faster" (reimplemented from the paper):

    1. normalise the metric, :math:`\hat m_i = m_i / \lVert m_i \rVert_2`;
    2. split each row's real tokens alternately into A (even rank) and B (odd rank);
    3. scores :math:`S_{ij} = \hat m_i \cdot \hat m_j` for :math:`i \in A, j \in B`, with protected tokens'
       rows and columns set to :math:`-\infty` (they neither merge nor absorb);
    4. each A token keeps its best edge :math:`j^*(i) = \arg\max_j S_{ij}`; the ``r`` A tokens with the highest
       :math:`S_{i j^*(i)}` are merged into their match by size-weighted mean,

       .. math:: x'_j = \frac{s_j x_j + \sum_{i \to j} s_i x_i}{s_j + \sum_{i \to j} s_i},
                 \qquad s'_j = s_j + \sum_{i \to j} s_i;

    5. the surviving tokens keep their original order.

    ``r`` may differ per row (a ``[B]`` tensor). The output has ``L = T − min_b r_b`` slots; a row merging more
    than ``min_b r_b`` turns the extra merged slots into pad slots (``valid`` False, size 0, x 0). Pads never
    merge, and the A/B split counts real tokens only, so a padded row gives the same merge as the row alone.
    Ties are broken by position (stable sort, first maximum).

    Args:
        x: ``[B, T, d]`` tokens.
        r: tokens to remove per row: int, or ``[B]`` ints, each in ``0..⌊n_b/2⌋`` (``n_b`` real tokens).
        metric: ``[B, T, d_m]`` similarity features (ToMe: the attention keys averaged over heads); default ``x``.
        sizes: ``[B, T]`` current token sizes; default 1 for real tokens, 0 for pads.
        protect: ``[B, T]`` bool, tokens that must stay as they are (e.g. CLS).
        valid: ``[B, T]`` bool, real tokens (default all).

    Returns:
        :class:`MergeResult`.

    Raises:
        ValueError: ``r`` negative, above 50% of a row's real tokens, or above what protection leaves mergeable
            (see :func:`mergeable_counts`); shape mismatches.

    Examples:
        >>> import torch
        >>> x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]]])
        >>> res = bipartite_merge(x, r=1)
        >>> res.x.shape, res.sizes.tolist(), res.assignment.tolist()
        (torch.Size([1, 3, 2]), [[2.0, 1.0, 1.0]], [[0, 0, 1, 2]])
        >>> res.x[0, 0].tolist()
        [1.0, 0.05000000074505806]
    """
    _check_x(x)
    B, T, d = x.shape
    dev = x.device
    valid_ = _mask_arg(valid, B, T, "valid", dev, True)
    protect_ = _mask_arg(protect, B, T, "protect", dev, False) & valid_
    if metric is None:
        metric = x
    else:
        _check_x(metric, "metric")
        if tuple(metric.shape[:2]) != (B, T):
            raise ValueError(f"metric must be [B, T, d_m] with B, T = {(B, T)}; got {tuple(metric.shape)}")
    if sizes is None:
        sizes_ = valid_.to(torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    else:
        if tuple(sizes.shape) != (B, T):
            raise ValueError(f"sizes must be [B, T] = {(B, T)}; got {tuple(sizes.shape)}")
        sizes_ = sizes.to(dev)
        if not sizes_.is_floating_point():
            sizes_ = sizes_.to(torch.float32)
    if isinstance(r, torch.Tensor):
        r_vec = r.to(device=dev, dtype=torch.long).reshape(-1)
        if r_vec.numel() == 1:
            r_vec = r_vec.expand(B)
        if r_vec.numel() != B:
            raise ValueError(f"r must be an int or a [B] = [{B}] tensor; got shape {tuple(r.shape)}")
    else:
        if isinstance(r, bool) or int(r) != r:
            raise TypeError(f"r must be an int (tokens removed per row), got {r!r}")
        r_vec = torch.full((B,), int(r), dtype=torch.long, device=dev)
    if bool((r_vec < 0).any()):
        raise ValueError(f"r must be >= 0, got {r_vec.tolist()}")
    n = valid_.sum(-1)
    half = n // 2
    if bool((r_vec > half).any()):
        b = int(torch.nonzero(r_vec > half)[0])
        raise ValueError(
            f"r={int(r_vec[b])} is more than 50% of row {b}'s {int(n[b])} real tokens (at most ⌊n/2⌋ = "
            f"{int(half[b])}); lower r or merge in several steps"
        )
    cap = mergeable_counts(valid_, protect_)
    if bool((r_vec > cap).any()):
        b = int(torch.nonzero(r_vec > cap)[0])
        raise ValueError(
            f"r={int(r_vec[b])} but row {b} has only {int(cap[b])} mergeable tokens once protected tokens are "
            "excluded (protected tokens neither merge nor absorb); lower r or protect fewer tokens"
        )
    r_min = int(r_vec.min()) if B else 0
    if int(r_vec.max() if B else 0) == 0:
        ar = torch.arange(T, device=dev).expand(B, T).contiguous()
        return MergeResult(x.clone(), sizes_.clone(), ar.clone(), ar, valid_.clone())

    rank = _real_ranks(valid_)
    free = valid_ & ~protect_
    is_a = free & (rank % 2 == 0)
    is_b = free & (rank % 2 == 1)
    m = F.normalize(metric.to(torch.promote_types(metric.dtype, torch.float32)), dim=-1)
    scores = m @ m.transpose(1, 2)  # [B, T, T]; only A rows x B columns are used
    allowed = is_a[:, :, None] & is_b[:, None, :]
    scores = scores.masked_fill(~allowed, -math.inf)
    node_max, node_idx = scores.max(dim=-1)  # best B partner of every A token (first max on ties)
    node_max = node_max.masked_fill(~is_a, -math.inf)
    order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    pos_in_order = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=dev).expand(B, T))
    src = is_a & (pos_in_order < r_vec[:, None])  # merged away
    # rows merging more than r_min keep their last (r_b - r_min) merged slots as pad slots
    to_pad = src & (pos_in_order >= r_min)
    removed = src & ~to_pad
    kept = ~removed
    L = T - r_min
    kept_columns = torch.sort(removed.to(torch.int8), dim=-1, stable=True).indices[:, :L]

    target = torch.where(src, node_idx, torch.arange(T, device=dev).expand(B, T))
    acc = torch.promote_types(x.dtype, sizes_.dtype)
    xs = x.to(acc) * sizes_.to(acc)[..., None]
    num = torch.zeros_like(xs).scatter_add_(1, target[..., None].expand(B, T, d), xs)
    den = torch.zeros(B, T, dtype=acc, device=dev).scatter_add_(1, target, sizes_.to(acc))
    received = torch.zeros(B, T, dtype=torch.long, device=dev).scatter_add_(1, target, src.long()) > 0
    merged_x = torch.where(
        received[..., None], num / den.clamp_min(torch.finfo(acc).tiny)[..., None], x.to(acc)
    )
    merged_x = merged_x.masked_fill(to_pad[..., None], 0.0).to(x.dtype)
    new_sizes = torch.where(received, den, sizes_.to(acc)).masked_fill(to_pad, 0.0).to(sizes_.dtype)
    new_valid = valid_ & ~to_pad

    out_index = (kept.long().cumsum(-1) - 1).clamp_min(0)  # output slot of each kept column
    assignment = torch.where(src, out_index.gather(1, node_idx), out_index)
    return MergeResult(
        x=_gather_tokens(merged_x, kept_columns),
        sizes=new_sizes.gather(1, kept_columns),
        assignment=assignment,
        kept_columns=kept_columns,
        valid=new_valid.gather(1, kept_columns),
    )


def unmerge(x_merged: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    r"""Broadcast merged tokens back to the original length: :math:`y_t = x'_{a(t)}` (ToMe's "unmerge").

    Args:
        x_merged: ``[B, L, ...]``.
        assignment: ``[B, T]`` output index of each original token (:attr:`MergeResult.assignment`).

    Returns:
        ``[B, T, ...]``.

    Examples:
        >>> import torch
        >>> unmerge(torch.tensor([[[1.0], [5.0]]]), torch.tensor([[0, 0, 1]])).flatten().tolist()
        [1.0, 1.0, 5.0]
    """
    if assignment.dim() != 2 or assignment.shape[0] != x_merged.shape[0]:
        raise ValueError(
            f"assignment must be [B, T] with B = {x_merged.shape[0]}; got {tuple(assignment.shape)}"
        )
    if assignment.numel() and (int(assignment.max()) >= x_merged.shape[1] or int(assignment.min()) < 0):
        raise ValueError(
            f"assignment indexes {int(assignment.max())} but x_merged has {x_merged.shape[1]} tokens; "
            "pass the assignment returned with this merged tensor"
        )
    return _gather_tokens(x_merged, assignment.to(x_merged.device).long())


_unmerge = unmerge  # tome_encoder's ``unmerge`` flag shadows the function


def proportional_attention_bias(sizes: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    r"""ToMe's proportional attention bias for keys: :math:`b_j = \log s_j` (Bolya et al. 2023, eq. 1).

    Added to the attention logits, :math:`A = \mathrm{softmax}(QK^\top/\sqrt{d} + \log s)`, a key of size
    :math:`s` counts like :math:`s` copies of itself. Invalid keys (``valid`` False, default ``sizes <= 0``) get
    the dtype's most negative finite value, so the result is also the additive padding mask.

    Args:
        sizes: ``[B, T]`` token sizes.
        valid: ``[B, T]`` real keys (default ``sizes > 0``).

    Returns:
        ``[B, T]`` float (broadcast it to ``[B, 1, 1, T]`` for an attention mask).

    Examples:
        >>> import torch
        >>> proportional_attention_bias(torch.tensor([[1.0, 2.0, 0.0]]))
        tensor([[ 0.0000e+00,  6.9315e-01, -3.4028e+38]])
    """
    s = sizes if sizes.is_floating_point() else sizes.to(torch.float32)
    v = (s > 0) if valid is None else valid.to(device=s.device, dtype=torch.bool)
    return torch.where(v, torch.log(s.clamp_min(torch.finfo(s.dtype).tiny)), torch.finfo(s.dtype).min)


def size_weighted_mean(x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    r"""Mean pooling of a merged sequence: :math:`\bar x = \sum_j s_j x_j / \sum_j s_j`, ``[B, d]``.

    Equals mean pooling of the unmerged sequence over its real tokens (each merged token stands for
    :math:`s_j` originals); pads have size 0.

    Examples:
        >>> import torch
        >>> size_weighted_mean(torch.tensor([[[2.0], [5.0]]]), torch.tensor([[3.0, 1.0]])).tolist()
        [[2.75]]
    """
    s = sizes.to(x.dtype if x.is_floating_point() else torch.float32)
    den = s.sum(-1, keepdim=True)
    if bool((den <= 0).any()):
        raise ValueError("a row has total size 0 (no real token); nothing to pool")
    return (x * s[..., None]).sum(1) / den


# ---------------------------------------------------------------------------------------------- Y = W·X
class Transformed(NamedTuple):
    """Result of :func:`transform_tokens`: tokens ``x`` ``[(B,) N, d]`` and their ``sizes`` (or None).

    Examples:
        >>> import torch
        >>> transform_tokens(torch.ones(3, 2), W_pool(3, 1)).sizes is None
        True
    """

    x: torch.Tensor
    sizes: torch.Tensor | None


def _batched_w(W: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    squeeze = x.dim() == 2
    xb = x[None] if squeeze else x
    if xb.dim() != 3:
        raise ValueError(f"x must be [T, d] or [B, T, d]; got {tuple(x.shape)}")
    Wb = W[None] if W.dim() == 2 else W
    if Wb.dim() != 3:
        raise ValueError(f"W must be [N, T] or [B, N, T]; got {tuple(W.shape)}")
    if Wb.shape[-1] != xb.shape[1]:
        raise ValueError(f"W has {Wb.shape[-1]} columns but x has {xb.shape[1]} tokens (W must be [N, T])")
    if Wb.shape[0] not in (1, xb.shape[0]):
        raise ValueError(f"W's batch {Wb.shape[0]} does not match x's batch {xb.shape[0]}")
    return Wb, xb, squeeze


def transform_tokens(x: torch.Tensor, W: torch.Tensor, sizes: torch.Tensor | None = None) -> Transformed:
    r"""Every token reduction as one linear map, :math:`Y = W X` (FiCoCo, "Rethinking Token Reduction in
    MLLMs"; Token Transforming, Zeng et al. 2024).

    - prune: rows of the identity (:func:`W_prune`);
    - merge: row-normalised, size-weighted groups (:func:`W_merge`), which reproduces :func:`bipartite_merge`;
    - soft: softmax similarity to anchors (:func:`W_soft`);
    - pool: adaptive averaging windows (:func:`W_pool`).

    With ``sizes`` (the input tokens' sizes, ``W ≥ 0``), each input's size is shared among the outputs that use
    it in proportion to their weights, :math:`s'_i = \sum_j s_j\, W_{ij} / \sum_k W_{kj}` (a column of zeros
    drops that token's size). For prune/merge/pool matrices (one non-zero per column) this is the sum of the
    sizes in each group, as in ToMe; total size is conserved whenever every column is used.

    Args:
        x: ``[T, d]`` or ``[B, T, d]``.
        W: ``[N, T]`` or ``[B, N, T]``.
        sizes: optional ``[T]`` / ``[B, T]``.

    Returns:
        :class:`Transformed` ``(x [(B,) N, d], sizes [(B,) N] or None)``.

    Examples:
        >>> import torch
        >>> x = torch.tensor([[1.0], [3.0], [10.0]])
        >>> transform_tokens(x, W_pool(3, 2), sizes=torch.ones(3))
        Transformed(x=tensor([[2.0000],
                [6.5000]]), sizes=tensor([1.5000, 1.5000]))
    """
    Wb, xb, squeeze = _batched_w(W, x)
    Wc = Wb.to(torch.promote_types(Wb.dtype, xb.dtype))
    y = Wc @ xb.to(Wc.dtype)
    new_sizes = None
    if sizes is not None:
        sb = sizes[None] if sizes.dim() == 1 else sizes
        if tuple(sb.shape) != tuple(xb.shape[:2]):
            raise ValueError(f"sizes must be [T] or [B, T] matching x; got {tuple(sizes.shape)}")
        col = Wc.sum(-2, keepdim=True)
        share = torch.where(
            col != 0, Wc / torch.where(col != 0, col, torch.ones_like(col)), torch.zeros_like(Wc)
        )
        new_sizes = (share @ sb.to(Wc.dtype)[..., None])[..., 0]
        if squeeze:
            new_sizes = new_sizes[0]
    return Transformed(y[0] if squeeze else y, new_sizes)


def W_prune(keep: torch.Tensor, T: int) -> torch.Tensor:
    r"""Pruning as rows of the identity: :math:`W_{ij} = [j = k_i]`, ``[(B,) K, T]``.

    Args:
        keep: kept column indices ``[K]`` / ``[B, K]`` (e.g. from :func:`~tokensmith.pruning.select.topk_keep`),
            or a boolean keep mask ``[T]`` / ``[B, T]`` with the same count in every row.
        T: number of input tokens.

    Examples:
        >>> import torch
        >>> W_prune(torch.tensor([0, 2]), 3)
        tensor([[1., 0., 0.],
                [0., 0., 1.]])
    """
    if keep.dtype == torch.bool:
        kb = keep[None] if keep.dim() == 1 else keep
        counts = kb.sum(-1)
        if bool((counts != counts[0]).any()):
            raise ValueError(f"a boolean keep mask needs the same count per row, got {counts.tolist()}")
        idx = torch.sort((~kb).to(torch.int8), dim=-1, stable=True).indices[:, : int(counts[0])]
        keep = idx[0] if keep.dim() == 1 else idx
    keep = keep.long()
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= T):
        raise ValueError(
            f"keep indices must lie in [0, {T}); got min {int(keep.min())}, max {int(keep.max())}"
        )
    return F.one_hot(keep, T).to(torch.float32)


def W_merge(
    assignment: torch.Tensor, sizes: torch.Tensor | None = None, n_out: int | None = None
) -> torch.Tensor:
    r"""Merging as row-normalised, size-weighted groups: :math:`W_{ij} = s_j [a(j) = i] / \sum_{k: a(k)=i} s_k`.

    With ``sizes=None`` every token has size 1 (plain group means). A group whose sizes sum to 0 (pad slots)
    takes the plain mean of its members. ``W_merge(res.assignment, sizes)`` applied by :func:`transform_tokens`
    reproduces :func:`bipartite_merge` (tested).

    Args:
        assignment: ``[T]`` / ``[B, T]`` output index of each token.
        sizes: ``[T]`` / ``[B, T]`` token sizes (default 1).
        n_out: number of outputs (default ``max(assignment) + 1``).

    Examples:
        >>> import torch
        >>> W_merge(torch.tensor([0, 0, 1]), torch.tensor([1.0, 3.0, 1.0]))
        tensor([[0.2500, 0.7500, 0.0000],
                [0.0000, 0.0000, 1.0000]])
    """
    a = assignment.long()
    squeeze = a.dim() == 1
    ab = a[None] if squeeze else a
    N = int(ab.max()) + 1 if n_out is None else int(n_out)
    if ab.numel() and (int(ab.min()) < 0 or int(ab.max()) >= N):
        raise ValueError(f"assignment values must lie in [0, {N}); got max {int(ab.max())}")
    if sizes is None:
        s = torch.ones(ab.shape, dtype=torch.float32, device=ab.device)
    else:
        s = (sizes[None] if sizes.dim() == 1 else sizes).to(ab.device)
        s = s if s.is_floating_point() else s.to(torch.float32)
        if tuple(s.shape) != tuple(ab.shape):
            raise ValueError(
                f"sizes must match assignment's shape {tuple(a.shape)}; got {tuple(sizes.shape)}"
            )
    member = F.one_hot(ab, N).transpose(1, 2).to(s.dtype)  # [B, N, T]
    w = member * s[:, None, :]
    tot = w.sum(-1, keepdim=True)
    cnt = member.sum(-1, keepdim=True)
    W = torch.where(tot > 0, w / torch.where(tot > 0, tot, torch.ones_like(tot)), member / cnt.clamp_min(1))
    return W[0] if squeeze else W


def W_soft(
    x: torch.Tensor, anchors: torch.Tensor, tau: float = 0.1, valid: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Soft merging: each output is a softmax-similarity average of all tokens,
    :math:`W_{ij} = \mathrm{softmax}_j(\cos(a_i, x_j) / \tau)` (Token Transforming's many-to-many matrix).

    Args:
        x: ``[B, T, d]`` tokens.
        anchors: ``[B, N, d]`` anchor vectors, or ``[B, N]`` integer indices of anchor tokens in ``x``.
        tau: temperature (> 0); small ``tau`` approaches hard nearest-anchor pooling.
        valid: ``[B, T]`` real tokens (pads get weight 0).

    Returns:
        ``[B, N, T]``, rows summing to 1.

    Examples:
        >>> import torch
        >>> x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]])
        >>> W = W_soft(x, torch.tensor([[0, 2]]), tau=0.05)
        >>> W.sum(-1).tolist(), bool(W[0, 0, 2] < 1e-6)
        ([[1.0, 1.0]], True)
    """
    _check_x(x)
    if float(tau) <= 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if not anchors.is_floating_point():
        if anchors.dim() != 2:
            raise ValueError(f"anchor indices must be [B, N]; got {tuple(anchors.shape)}")
        anchors = _gather_tokens(x, anchors.long().to(x.device))
    elif anchors.dim() != 3 or anchors.shape[-1] != x.shape[-1]:
        raise ValueError(f"anchors must be [B, N, d] vectors or [B, N] indices; got {tuple(anchors.shape)}")
    v = _mask_arg(valid, x.shape[0], x.shape[1], "valid", x.device, True)
    sim = F.normalize(anchors.to(x.dtype), dim=-1) @ F.normalize(x, dim=-1).transpose(1, 2)
    return torch.softmax((sim / float(tau)).masked_fill(~v[:, None, :], -math.inf), dim=-1)


def W_pool(T: int, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""Adaptive average pooling of ``T`` tokens into ``n``: row ``i`` averages columns
    :math:`\lfloor iT/n \rfloor \ldots \lceil (i+1)T/n \rceil - 1` (the windows of ``adaptive_avg_pool1d``).
    ``dtype`` sets the matrix's precision (use float64 with float64 tokens: ``1/3`` in float32 is not exact).

    Examples:
        >>> W_pool(4, 2)
        tensor([[0.5000, 0.5000, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.5000, 0.5000]])
    """
    if int(n) < 1 or int(T) < 1:
        raise ValueError(f"need T >= 1 and n >= 1, got T={T}, n={n}")
    W = torch.zeros(int(n), int(T), dtype=dtype)
    for i in range(int(n)):
        a, b = (i * T) // n, -((-(i + 1) * T) // n)
        W[i, a:b] = 1.0 / (b - a)
    return W


# ---------------------------------------------------------------------------------------------- cluster pooling
@dataclass(frozen=True)
class ClusterResult(MergeResult):
    """:class:`MergeResult` of :func:`cluster_pool` plus the weighted k-means objective after each iteration
    (``history[0]`` is the initialisation's). ``kept_columns`` holds each cluster's first member.

    Examples:
        >>> import torch
        >>> res = cluster_pool(torch.tensor([[[0.0], [9.0], [0.5]]]), 2)
        >>> res.kept_columns.tolist(), res.history[-1] <= res.history[0]
        ([[0, 1]], True)
    """

    history: tuple[float, ...] = ()


def cluster_pool(
    x: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    iters: int = 25,
) -> ClusterResult:
    r"""Token Pooling (Marin et al. 2023, "Token Pooling in Vision Transformers"): weighted k-means over the
    tokens of each row, which then stand in for them (PRN-10).

    Minimises :math:`\sum_i w_i \lVert x_i - c_{a(i)} \rVert^2` by Lloyd iterations (assign each token to the
    nearest centre, then :math:`c_k = \sum_{a(i)=k} w_i x_i / \sum_{a(i)=k} w_i`); the objective never
    increases. Initialisation is deterministic: the heaviest token, then greedy weighted farthest points
    (:math:`\arg\max_i w_i \min_k \lVert x_i - c_k \rVert^2`), so no RNG is used. Clusters are output in the
    order of their first member; sizes are the summed weights, so :math:`\sum_k s_k c_k = \sum_i w_i x_i`.

    Args:
        x: ``[B, T, d]``.
        k: clusters per row (``1 ≤ k ≤`` real tokens of every row).
        weights: ``[B, T]`` non-negative weights (ToMe sizes, attention mass...); default 1 for real tokens.
        valid: ``[B, T]`` real tokens (pads are assigned to cluster 0 but carry no weight).
        iters: maximum Lloyd iterations (stops early when assignments no longer change).

    Examples:
        >>> import torch
        >>> x = torch.tensor([[[0.0], [0.1], [5.0], [5.2], [0.2]]])
        >>> res = cluster_pool(x, 2)
        >>> res.assignment.tolist(), res.sizes.tolist()
        ([[0, 0, 1, 1, 0]], [[3.0, 2.0]])
    """
    _check_x(x)
    B, T, d = x.shape
    v = _mask_arg(valid, B, T, "valid", x.device, True)
    n = v.sum(-1)
    k = int(k)
    if k < 1 or bool((n < k).any()):
        raise ValueError(f"k={k} must be >= 1 and at most every row's real-token count {n.tolist()}")
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)
    w = v.to(acc) if weights is None else weights.to(device=x.device, dtype=acc) * v
    if weights is not None and (tuple(weights.shape) != (B, T) or bool((weights < 0).any())):
        raise ValueError("weights must be a non-negative [B, T] tensor")
    rows = torch.arange(B, device=x.device)
    # deterministic init: heaviest token, then weighted farthest point
    first = torch.where(v, w, torch.full_like(w, -1.0)).argmax(-1)
    centres = [xa[rows, first]]
    mind = ((xa - centres[0][:, None]) ** 2).sum(-1)
    chosen = torch.zeros(B, T, dtype=torch.bool, device=x.device)
    chosen[rows, first] = True
    for _ in range(1, k):
        score = torch.where(v & ~chosen, (w.clamp_min(1e-12)) * mind, torch.full_like(mind, -1.0))
        nxt = score.argmax(-1)
        chosen[rows, nxt] = True
        c = xa[rows, nxt]
        centres.append(c)
        mind = torch.minimum(mind, ((xa - c[:, None]) ** 2).sum(-1))
    C = torch.stack(centres, 1)  # [B, k, d]

    def assign(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = (
            torch.cdist(xa, C) ** 2 if acc != torch.float64 else ((xa[:, :, None] - C[:, None]) ** 2).sum(-1)
        )
        dmin, a = dist.min(-1)
        return a.masked_fill(~v, 0), dmin

    def objective(a: torch.Tensor, C: torch.Tensor) -> float:
        return float((w * ((xa - _gather_tokens(C, a)) ** 2).sum(-1)).sum())

    a, _ = assign(C)
    history = [objective(a, C)]
    for _ in range(int(iters)):
        onehot = F.one_hot(a, k).to(acc) * w[..., None]  # [B, T, k]
        mass = onehot.sum(1)  # [B, k]
        newC = (onehot.transpose(1, 2) @ xa) / mass.clamp_min(1e-30)[..., None]
        C = torch.where(mass[..., None] > 0, newC, C)  # an empty cluster keeps its centre
        a_new, _ = assign(C)
        history.append(objective(a_new, C))
        if torch.equal(a_new, a):
            a = a_new
            break
        a = a_new
    onehot = F.one_hot(a, k).to(acc) * w[..., None]
    mass = onehot.sum(1)
    C = torch.where(mass[..., None] > 0, (onehot.transpose(1, 2) @ xa) / mass.clamp_min(1e-30)[..., None], C)
    # order clusters by their first member (clusters without real members go last)
    pos = torch.arange(T, device=x.device).expand(B, T)
    first_member = torch.full((B, k), T, dtype=torch.long, device=x.device)
    first_member = first_member.scatter_reduce(1, a, torch.where(v, pos, T), reduce="amin")
    perm = torch.sort(first_member, dim=-1, stable=True).indices  # new slot -> old cluster
    inv = torch.empty_like(perm).scatter_(1, perm, torch.arange(k, device=x.device).expand(B, k))
    return ClusterResult(
        x=_gather_tokens(C, perm).to(x.dtype),
        sizes=mass.gather(1, perm),
        assignment=inv.gather(1, a).masked_fill(~v, 0),
        kept_columns=first_member.gather(1, perm).clamp_max(T - 1),
        valid=mass.gather(1, perm) > 0,
        history=tuple(history),
    )


# ---------------------------------------------------------------------------------------------- encoder target
@dataclass
class MergeReport(ReductionReport):
    """:class:`~tokensmith.pruning.report.ReductionReport` of :func:`tome_encoder` (``target="encoder"``,
    ``action="merge"``, ``physical=True``: later layers run on shorter tensors).

    ``kept`` is ``{layer: [B, 1]}``, the real tokens *entering* each layer in the last forward; ``events`` has
    one entry per merge (forward index, layer, tokens before/after, the r applied per row). The last forward's
    final state is kept too:

    Attributes:
        r: requested tokens merged per layer ``{layer: r}``.
        where: ``"attn"`` (between attention and MLP, as in ToMe) or ``"layer"`` (at the layer output).
        proportional: whether proportional attention (``+log s`` on key logits) was on.
        unmerged: whether the final hidden states were broadcast back to the input length.
        calls: model forwards run inside the block.
        tokens_out: ``[B]`` real tokens after the last layer.
        sizes: ``[B, L]`` sizes of the final merged tokens.
        valid: ``[B, L]`` real final merged tokens.
        assignment: ``[B, T]`` final merged token of each input token (``unmerge(h, assignment)``).

    Examples:
        >>> rep = MergeReport(target="encoder", action="merge", positions="preserve", r={1: 1})
        >>> rep.summary()["r"], rep.physical, rep.tokens_per_layer()
        ({1: 1}, True, {})
    """

    r: dict[int, int] = field(default_factory=dict)
    where: str = "attn"
    proportional: bool = True
    unmerged: bool = True
    calls: int = 0
    tokens_out: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    assignment: torch.Tensor | None = None

    def tokens_per_layer(self) -> dict[int, list[int]]:
        """``{layer: [real tokens entering it, per row]}`` of the last forward."""
        return {int(k): v[:, 0].tolist() for k, v in sorted(self.kept.items())}

    def summary(self) -> dict[str, Any]:
        s = super().summary()
        s.update(
            r={int(k): int(v) for k, v in self.r.items()},
            where=self.where,
            proportional=self.proportional,
            unmerged=self.unmerged,
            calls=self.calls,
            tokens_per_layer=self.tokens_per_layer(),
            tokens_out=None if self.tokens_out is None else self.tokens_out.tolist(),
        )
        return s


class _ProbeStop(Exception):
    pass


_MERGE_POINT: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_ACTIVE: weakref.WeakSet[Any] = weakref.WeakSet()


def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _replace_first(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, tuple):
        return (new, *out[1:])
    if isinstance(out, list):
        return [new, *out[1:]]
    raise TypeError(f"cannot replace the hidden states in a module output of type {type(out).__name__}")


def _merge_point(adapter: ModelAdapter) -> str:
    """Measured once per model: can tokens be merged at the attention module's output (post-LN BERT, whose
    attention module returns the residual stream entering the MLP), or only at the layer output (pre-LN
    blocks add the residual after the attention module, so a shorter attention output fails to add)?"""
    model = adapter.model
    if model in _MERGE_POINT:
        return _MERGE_POINT[model]
    attn = adapter.structure.attn[0]
    if attn is None:
        _MERGE_POINT[model] = "layer"
        return "layer"
    ids = adapter.tokenizer("a b c d e f", return_tensors="pt")["input_ids"].to(adapter.device)
    seen: dict[str, int] = {}

    def cut(mod: Any, args: Any, out: Any) -> Any:
        h = _first(out)
        return _replace_first(out, h[:, :-1])

    def stop(mod: Any, args: Any, out: Any) -> None:
        seen["T"] = int(_first(out).shape[1])
        raise _ProbeStop

    handles = [attn.register_forward_hook(cut), adapter.structure.layers[0].register_forward_hook(stop)]
    point = "layer"
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except _ProbeStop:
        point = "attn" if seen.get("T") == ids.shape[1] - 1 else "layer"
    except (RuntimeError, ValueError, IndexError):
        point = "layer"
    finally:
        for h in handles:
            h.remove()
    _MERGE_POINT[model] = point
    return point


def _layer_mask_index(layer: Any) -> int | None:
    try:
        params = list(inspect.signature(layer.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return None
    return params.index("attention_mask") if "attention_mask" in params else None


def _valid_from_mask(mask: Any, B: int, T: int, device: torch.device) -> torch.Tensor:
    if isinstance(mask, torch.Tensor):
        if mask.dim() == 2 and tuple(mask.shape) == (B, T):
            return mask.to(device).bool()
        if mask.dim() == 4 and mask.shape[-1] == T and mask.shape[0] in (1, B):
            m = mask[:, 0].to(device)
            ok = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
            return ok.any(-2).expand(B, T).clone()
    return torch.ones(B, T, dtype=torch.bool, device=device)


def _drop_pad_slots(res: MergeResult) -> tuple[MergeResult, torch.Tensor]:
    """Drop the pad columns every row can spare: keep ``max_b`` (real tokens of row b) slots per row (its real
    tokens in order, then its first pad slots). Returns the compacted result and the kept slots ``[B, L']``;
    a dropped pad slot's tokens go to the kept slot before it."""
    B, L = res.valid.shape
    n = res.valid.sum(-1)
    L2 = int(n.max()) if B else L
    if L2 >= L:
        return res, torch.arange(L, device=res.valid.device).expand(B, L)
    pad_rank = (~res.valid).long().cumsum(-1) - 1
    keep = res.valid | (pad_rank < (L2 - n)[:, None])
    cols = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :L2]
    slot_map = (keep.long().cumsum(-1) - 1).clamp_min(0)
    out = MergeResult(
        x=_gather_tokens(res.x, cols),
        sizes=res.sizes.gather(1, cols),
        assignment=slot_map.gather(1, res.assignment),
        kept_columns=res.kept_columns.gather(1, cols),
        valid=res.valid.gather(1, cols),
    )
    return out, cols


class _State:
    def __init__(self) -> None:
        self.reset(None, None)

    def reset(self, ids: torch.Tensor | None, mask2d: torch.Tensor | None) -> None:
        self.ids = ids
        self.mask2d = mask2d
        self.valid: torch.Tensor | None = None
        self.sizes: torch.Tensor | None = None
        self.protect: torch.Tensor | None = None
        self.assign: torch.Tensor | None = None
        self.T0 = 0
        self.B = 0
        self.keys: dict[int, torch.Tensor] = {}
        self.assign_after: dict[int, torch.Tensor] = {}
        self.len_in: dict[int, int] = {}
        self.len_mlp: dict[int, int] = {}
        self.len_after: dict[int, int] = {}
        self.final_id: int | None = None
        self.started = False


@contextmanager
def tome_encoder(
    adapter: ModelAdapter,
    r: int | Sequence[int] | Mapping[int, int],
    layers: Sequence[int] | None = None,
    proportional: bool = True,
    *,
    unmerge: bool = True,
    protect: str | torch.Tensor | None = "special",
    where: str = "auto",
) -> Iterator[MergeReport]:
    r"""ToMe inside a (non-causal) encoder's forward: under the block, ``adapter.forward``,
    ``adapter.sentence_embedding``, ``adapter.pool`` and ``adapter.hidden_states`` run with ``r`` tokens merged
    in each chosen layer (Bolya et al. 2023, "Token Merging: Your ViT But Faster"; PRN-8).

    In layer :math:`l`, after the attention, :func:`bipartite_merge` merges ``r`` tokens using the layer's keys
    averaged over heads as the metric, :math:`m_t = \frac1H \sum_h k_{t,h}`, with special tokens (CLS, SEP)
    protected and pads never merged; the MLP and every later layer then run on the shorter tensors (a
    *physical* reduction). With proportional attention, later layers add :math:`\log s_j` to the logits of key
    :math:`j` of size :math:`s_j`, passed to the layers as a float additive mask ``[B, 1, 1, L]`` (pads get the
    most negative value), so a merged token attracts attention like the :math:`s_j` tokens it stands for.

    Where the merge happens is measured once per model (``where="auto"``): between attention and MLP when the
    attention module returns the residual stream (post-LN BERT, RoBERTa, ELECTRA, MiniLM: exactly ToMe), else
    at the layer output (``"layer"``: blocks that add the residual after the attention module).

    The last layer's output is broadcast back to the input length (``unmerge=True``, the default: merged token
    :math:`j`'s state goes to every token merged into it), so pooling, heads and ``hidden_states`` keep their
    shapes; intermediate ``hidden_states`` are unmerged the same way. Mean pooling of the unmerged output is
    then the size-weighted mean of the merged tokens. With ``unmerge=False`` the model returns the merged
    ``[B, L, d]`` states; the report holds their ``sizes``, ``valid`` and ``assignment``
    (:func:`size_weighted_mean` pools them).

    ``r`` is clamped per row and layer to what the row can merge (:func:`mergeable_counts`: at most half its real
    tokens, protected tokens excluded); the clamp is noted in the report. Rows of a padded batch merge exactly
    as they would alone. Hooks (forward pre-hooks on the layers replace the ``attention_mask`` argument; no weight
    is touched) are removed on exit, also on exceptions.

    Args:
        adapter: a non-causal encoder adapter (BERT family), e.g. ``ts.load("minilm-l6")``.
        r: tokens merged per layer: an int for every chosen layer, a per-layer sequence, or ``{layer: r}``.
        layers: layers that merge (default all; ignored when ``r`` is a mapping).
        proportional: add :math:`\log s` to later layers' attention logits.
        unmerge: broadcast the final states back to the input length.
        protect: ``"special"`` (tokenizer special tokens; the first real token when only embeddings are given),
            ``"first"``, ``None``, or a ``[B, T]`` bool tensor.
        where: ``"auto"``, ``"attn"`` or ``"layer"``.

    Yields:
        :class:`MergeReport` (physical, tokens per layer, sizes and assignment of the last forward).

    Raises:
        ValueError: a causal model (ToMe in causal LMs needs a non-causal span), flash/flex attention (no
            additive mask), rotary encoders (positions would need merging), bad ``r``/``layers``/``where``.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("bert")
        >>> with tome_encoder(ad, r=2) as rep:
        ...     emb = ad.sentence_embedding(["the quick brown fox jumps over the lazy dog"])
        >>> rep.physical, rep.tokens_per_layer()
        (True, {0: [11], 1: [9]})
        >>> emb.shape[0]
        1
    """
    st = adapter.structure
    if adapter.is_causal:
        raise ValueError(
            "tome_encoder merges tokens in encoders only; a causal LM needs merging restricted to a non-causal "
            "span (PRN-8), which is not implemented. Use bipartite_merge on your own states instead."
        )
    impl = str(getattr(adapter.model.config, "_attn_implementation", "eager") or "eager")
    if "flash" in impl or "flex" in impl:
        raise ValueError(
            f"attention implementation {impl!r} takes no additive mask; load the model with "
            "attn_implementation='sdpa' or 'eager' for tome_encoder"
        )
    L_total = st.num_layers
    if isinstance(r, Mapping):
        rs = {int(k): int(v) for k, v in r.items()}
    elif isinstance(r, Sequence) and not isinstance(r, str):
        if len(r) != L_total:
            raise ValueError(f"a per-layer r needs {L_total} entries (one per layer), got {len(r)}")
        rs = {i: int(v) for i, v in enumerate(r)}
    else:
        if isinstance(r, bool) or not isinstance(r, int):
            raise TypeError(f"r must be an int, a per-layer sequence or a {{layer: r}} dict, got {r!r}")
        chosen = list(range(L_total)) if layers is None else [int(i) for i in layers]
        rs = {i: int(r) for i in chosen}
    for i, v in rs.items():
        if not 0 <= i < L_total:
            raise ValueError(f"layer {i} out of range: the model has {L_total} layers (0..{L_total - 1})")
        if v < 0:
            raise ValueError(f"r must be >= 0 (tokens merged per layer), got {v} at layer {i}")
    if where not in ("auto", "attn", "layer"):
        raise ValueError(f"where must be 'auto', 'attn' or 'layer', got {where!r}")
    if isinstance(protect, str) and protect not in ("special", "first"):
        raise ValueError(f"protect must be 'special', 'first', None or a [B, T] bool tensor, got {protect!r}")
    if adapter.model in _ACTIVE:
        raise ValueError("tome_encoder is already active on this model; nest nothing, exit the first block")
    point = _merge_point(adapter) if where == "auto" else where
    if point == "attn" and any(st.attn[i] is None for i in rs):
        raise ValueError("where='attn' needs the attention module of every merging layer; use where='layer'")

    report = MergeReport(
        target="encoder",
        action="merge",
        positions="preserve",
        scorer="keys_mean",
        physical=True,
        r=dict(sorted(rs.items())),
        where=point,
        proportional=bool(proportional),
        unmerged=bool(unmerge),
    )
    state = _State()
    special = sorted(set(int(i) for i in getattr(adapter.tokenizer, "all_special_ids", []) or []))
    heads = st.num_kv_heads or st.num_heads
    cfg = adapter.model.config
    d_model = int(st.hidden_size)
    d_ff = int(getattr(cfg, "intermediate_size", 4 * d_model) or 4 * d_model)
    mask_idx = [_layer_mask_index(layer) for layer in st.layers]
    merge_layers = {i for i, v in rs.items() if v > 0}

    def pre_model(mod: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        am = kwargs.get("attention_mask")
        if am is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            am = args[1]
        state.reset(ids, am if isinstance(am, torch.Tensor) and am.dim() == 2 else None)

    def start(hidden: torch.Tensor, mask: Any) -> None:
        # layer 0 starts every forward (also a direct call of a submodel)
        state.reset(state.ids, state.mask2d)
        B, T = hidden.shape[:2]
        dev = hidden.device
        state.B, state.T0 = B, T
        if state.mask2d is not None and tuple(state.mask2d.shape) == (B, T):
            valid = state.mask2d.to(dev).bool()
        else:
            valid = _valid_from_mask(mask, B, T, dev)
        state.valid = valid
        state.sizes = valid.to(torch.float32)
        if isinstance(protect, torch.Tensor):
            if tuple(protect.shape) != (B, T):
                raise ValueError(
                    f"protect must be [B, T] = {(B, T)} for this forward; got {tuple(protect.shape)}"
                )
            prot = protect.to(dev).bool()
        elif protect == "special" and state.ids is not None and tuple(state.ids.shape) == (B, T) and special:
            prot = torch.isin(state.ids.to(dev), torch.tensor(special, device=dev))
        elif protect in ("special", "first"):
            if protect == "special":
                report.note("no input ids seen: protected the first real token of each row (CLS)")
            prot = _real_ranks(valid) == 0
        else:
            prot = torch.zeros_like(valid)
        state.protect = prot & valid
        state.assign = torch.arange(T, device=dev).expand(B, T).contiguous()
        state.started = True
        report.tokens_in = valid.sum(-1).cpu()
        report.kept = {}

    def make_pre_layer(li: int) -> Any:
        def pre_layer(mod: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs["hidden_states"]
            idx = mask_idx[li]
            if "attention_mask" in kwargs:
                mask = kwargs["attention_mask"]
            elif idx is not None and len(args) > idx:
                mask = args[idx]
            else:
                mask = None
            if li == 0 or not state.started:
                start(hidden, mask)
            assert state.valid is not None and state.sizes is not None
            if hidden.shape[1] != state.valid.shape[1]:
                raise RuntimeError(
                    f"layer {li} got {hidden.shape[1]} tokens but token merging tracks {state.valid.shape[1]}; "
                    "something else changed the sequence length inside tome_encoder"
                )
            if kwargs.get("position_embeddings") is not None:
                raise ValueError(
                    "this encoder passes rotary position embeddings to its layers; merged tokens would need merged "
                    "positions, which tome_encoder does not implement (BERT-style absolute positions only)"
                )
            if proportional:
                bias = proportional_attention_bias(state.sizes, state.valid)
            else:
                bias = torch.where(state.valid, 0.0, torch.finfo(torch.float32).min)
            m = bias.to(hidden.dtype if hidden.is_floating_point() else torch.float32)
            m = m.clamp_min(torch.finfo(m.dtype).min)[:, None, None, :]
            if "attention_mask" in kwargs or idx is None or len(args) <= idx:
                kwargs = {**kwargs, "attention_mask": m}
            else:
                args = (*args[:idx], m, *args[idx + 1 :])
            report.kept[li] = state.valid.sum(-1, keepdim=True).cpu()
            state.len_in[li] = int(hidden.shape[1])
            return args, kwargs

        return pre_layer

    def make_key_hook(li: int) -> Any:
        def key_hook(mod: Any, args: Any, out: Any) -> None:
            k = _first(out).detach()
            if heads and k.shape[-1] % heads == 0:
                k = k.reshape(*k.shape[:-1], heads, k.shape[-1] // heads).mean(-2)
            state.keys[li] = k

        return key_hook

    def do_merge(li: int, hidden: torch.Tensor) -> torch.Tensor:
        assert state.valid is not None and state.sizes is not None and state.protect is not None
        cap = mergeable_counts(state.valid, state.protect)
        r_vec = cap.clamp_max(rs[li])
        if bool((r_vec < rs[li]).any()):
            report.note(
                f"layer {li}: r={rs[li]} clamped to {sorted(set(r_vec.tolist()))} where rows had fewer "
                "mergeable tokens (ToMe's r <= 50% of unprotected tokens)"
            )
        metric = state.keys.pop(li, None)
        if metric is None or tuple(metric.shape[:2]) != tuple(hidden.shape[:2]):
            report.note(f"layer {li}: keys not seen; merged by hidden-state similarity")
            metric = hidden
        before = state.valid.sum(-1)
        res = bipartite_merge(
            hidden, r_vec, metric=metric, sizes=state.sizes, protect=state.protect, valid=state.valid
        )
        prot = state.protect.gather(1, res.kept_columns)
        res, cols = _drop_pad_slots(res)
        state.protect = prot.gather(1, cols) & res.valid
        state.valid, state.sizes = res.valid, res.sizes
        state.assign = res.assignment.gather(1, state.assign)
        report.events.append(
            {
                "call": report.calls,
                "layer": li,
                "tokens_before": before.tolist(),
                "tokens_after": res.valid.sum(-1).tolist(),
                "r": r_vec.tolist(),
                "length": [int(hidden.shape[1]), int(res.x.shape[1])],
            }
        )
        return res.x

    def make_attn_hook(li: int) -> Any:
        def attn_hook(mod: Any, args: Any, out: Any) -> Any:
            if not state.started:
                return None
            return _replace_first(out, do_merge(li, _first(out)))

        return attn_hook

    def make_post_layer(li: int) -> Any:
        def post_layer(mod: Any, args: Any, out: Any) -> Any:
            if not state.started:
                return None
            h = _first(out)
            state.len_mlp[li] = int(h.shape[1])
            if point == "layer" and li in merge_layers:
                h = do_merge(li, h)
            assert state.assign is not None
            state.assign_after[li] = state.assign
            state.len_after[li] = int(h.shape[1])
            if li == L_total - 1 and unmerge:
                h = _unmerge(h, state.assign)
                state.final_id = id(h)
            return _replace_first(out, h)

        return post_layer

    def post_model(mod: Any, args: Any, kwargs: dict, out: Any) -> Any:
        if not state.started:
            return None
        report.calls += 1
        state.ids, state.mask2d = None, None  # a later direct call of a submodule must not reuse them
        assert state.valid is not None and state.assign is not None
        report.tokens_out = state.valid.sum(-1).cpu()
        report.sizes, report.valid, report.assignment = state.sizes, state.valid, state.assign
        base = L_total * (
            8 * d_model**2 * state.T0 + 4 * d_model * state.T0**2 + 4 * d_model * d_ff * state.T0
        )
        now = 0
        for li in range(L_total):
            ta = state.len_in.get(li, state.T0)
            tm = state.len_mlp.get(li, ta)
            now += 8 * d_model**2 * ta + 4 * d_model * ta**2 + 4 * d_model * d_ff * tm
        report.flops_ratio = now / base if base else None
        hs = getattr(out, "hidden_states", None) if not isinstance(out, tuple) else None
        if unmerge and isinstance(hs, (tuple, list)) and len(hs) == L_total + 1:
            last = getattr(out, "last_hidden_state", None)
            fixed = [hs[0]]
            for i in range(1, L_total + 1):
                h = hs[i]
                if h is last or id(h) == state.final_id or i - 1 not in state.assign_after:
                    fixed.append(h)
                elif h.shape[1] == state.len_after[i - 1]:
                    fixed.append(_unmerge(h, state.assign_after[i - 1]))
                else:
                    fixed.append(h)
            out.hidden_states = tuple(fixed)
        elif unmerge and isinstance(hs, (tuple, list)):
            report.note("hidden_states not of length num_layers + 1: left merged")
        return out

    handles = [
        adapter.model.register_forward_pre_hook(pre_model, with_kwargs=True),
        adapter.model.register_forward_hook(post_model, with_kwargs=True),
    ]
    _ACTIVE.add(adapter.model)
    try:
        for li, layer in enumerate(st.layers):
            handles.append(layer.register_forward_pre_hook(make_pre_layer(li), with_kwargs=True))
            if li in merge_layers:
                kp = st.k_proj[li] if li < len(st.k_proj) else None
                if kp is not None:
                    handles.append(kp.register_forward_hook(make_key_hook(li)))
                else:
                    report.note(f"layer {li}: no key projection found; merging by hidden-state similarity")
                if point == "attn":
                    handles.append(st.attn[li].register_forward_hook(make_attn_hook(li)))
            handles.append(layer.register_forward_hook(make_post_layer(li)))
        if not merge_layers:
            report.note("r = 0 everywhere: nothing merged (masks still go through the merge path)")
        yield report
    finally:
        for h in handles:
            h.remove()
        _ACTIVE.discard(adapter.model)
