"""Multi-token prediction (METHODS.md OPT-B6, MOD-15) and self-speculative decoding with its heads (DEC-4).

Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token Prediction": a shared trunk
``h_t = f(x_≤t)`` feeds ``n`` heads, head ``i`` predicting token ``x_{t+i}`` through the *shared* unembedding
``W_U``; the loss sums the heads' cross-entropies,

    L = Σ_{i=1..n} CE(W_U · head_i(h_t), x_{t+i}),

where each CE is the mean over the positions ``t`` whose target ``x_{t+i}`` exists (positions past the end
of a row, padding and unscored targets are masked). Head 1 is the model's own next-token head
(``head_1 = identity``: ``W_U·h_t`` is then exactly the model's logits), so ``n = 1`` is ordinary next-token
training. Here the extra heads are :class:`MTPHead` residual blocks attached beside the model with
:func:`tokensmith.models.heads.add_head` and unembedded with :meth:`ModelAdapter.unembed` (final norm, LM head,
logit scale, soft-capping), so the unembedding is shared by construction.

Decoding (Stern et al. 2018, "Blockwise Parallel Decoding for Deep Autoregressive Models"; the greedy
acceptance of Medusa, Cai et al. 2024): from the trunk state at the last accepted token, the base head gives
the next token ``y_1 = argmax W_U h`` and the extra heads draft ``d_2 … d_{k+1}``; one forward of
``[y_1, d_2, …, d_{k+1}]`` over the KV cache gives the base model's greedy choices ``g_0 … g_k`` after each of
them. The longest prefix with ``d_{j+2} = g_j`` is accepted, plus ``g_a`` (the base model's own next token), and
the cache is cropped back to the accepted tokens. Every emitted token is the base model's greedy token, so the
output equals plain greedy decoding; only the number of forward calls changes.

Examples:
    >>> import torch, tokensmith as ts
    >>> from tokensmith.optimization.training.mtp import add_mtp_heads, mtp_loss, self_speculative_generate
    >>> ad = ts.tiny("llama")
    >>> heads = add_mtp_heads(ad, 2)                 # predict t+2 and t+3 (head 1 is the model's own)
    >>> loss = mtp_loss(ad, ad.encode_batch(["The cat sat on the mat"]))
    >>> loss.backward()                              # reaches the heads and the trunk
    >>> res = self_speculative_generate(ad, "Once upon", max_new_tokens=8, progress=False)
    >>> bool(torch.equal(res.new_tokens[0], ad.generate("Once upon", max_new_tokens=8).new_tokens[0]))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokensmith.models import ModelAdapter, kvcache
from tokensmith.models.heads import Head, add_head, heads, resolve_hook_point

__all__ = [
    "MTPHead",
    "add_mtp_heads",
    "mtp_heads",
    "multi_token_loss",
    "mtp_loss",
    "self_speculative_generate",
    "SpeculativeResult",
]


class MTPHead(nn.Module):
    """One extra prediction head: a residual MLP block on the trunk's hidden state,

        head(h) = h + W_2 · φ(W_1 · RMSNorm(h)),

    whose output goes through the model's shared unembedding (``adapter.unembed``: final norm, LM head), as in
    Gloeckle et al. 2024 (shared trunk and unembedding; their heads are transformer layers, this one is the
    lighter residual block of Medusa, Cai et al. 2024). With ``zero_init=True`` (default) ``W_2 = 0``, so a
    fresh head is the identity and drafts the model's own next token (Medusa's initialisation); with
    ``zero_init=False`` both matrices are random (a "bad" untrained head).

    Args:
        hidden_size: ``d`` of the trunk.
        intermediate_size: width of the MLP (default ``d``).
        offset: which future token the head predicts (``2`` = ``x_{t+2}``); metadata for
            :func:`mtp_heads` and :func:`self_speculative_generate`.
        zero_init: start as the identity (``W_2 = 0``).
        eps: RMSNorm epsilon.
        seed: initialisation seed (a private ``torch.Generator``; the global RNG is not touched).

    Examples:
        >>> import torch
        >>> h = torch.randn(3, 8)
        >>> bool(torch.equal(MTPHead(8)(h), h))            # zero-init: identity
        True
        >>> MTPHead(8, 16, zero_init=False, seed=1)(h).shape
        torch.Size([3, 8])
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int | None = None,
        *,
        offset: int = 2,
        zero_init: bool = True,
        eps: float = 1e-6,
        seed: int = 0,
    ):
        super().__init__()
        if int(hidden_size) < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        m = int(intermediate_size) if intermediate_size is not None else int(hidden_size)
        if m < 1:
            raise ValueError(f"intermediate_size must be >= 1, got {intermediate_size}")
        if int(offset) < 2:
            raise ValueError(
                f"offset must be >= 2 (offset 1 is the model's own next-token head), got {offset}"
            )
        d = int(hidden_size)
        self.offset = int(offset)
        self.norm = nn.RMSNorm(d, eps=eps)
        self.up = nn.utils.skip_init(nn.Linear, d, m)
        self.down = nn.utils.skip_init(nn.Linear, m, d)
        self.head_config = {
            "hidden_size": d,
            "intermediate_size": m,
            "offset": self.offset,
            "zero_init": bool(zero_init),
            "eps": float(eps),
            "seed": int(seed),
        }
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            self.up.weight.copy_(torch.randn(m, d, generator=g) / math.sqrt(d))
            self.up.bias.zero_()
            if zero_init:
                self.down.weight.zero_()
            else:
                self.down.weight.copy_(torch.randn(d, m, generator=g) / math.sqrt(m))
            self.down.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(nn.functional.silu(self.up(self.norm(h))))


def add_mtp_heads(
    adapter: ModelAdapter,
    n: int,
    hidden_layer: int = -1,
    *,
    intermediate_size: int | None = None,
    zero_init: bool = True,
    seed: int = 0,
    prefix: str = "mtp",
    dtype: torch.dtype | None = None,
) -> list[MTPHead]:
    """Attach ``n`` extra heads predicting ``x_{t+2} … x_{t+n+1}`` (head 1 is the model's own next-token head).

    Head ``i`` (``i = 2 … n+1``) is an :class:`MTPHead` named ``f"{prefix}{i}"`` reading
    ``layers.{hidden_layer}.resid_post`` (default: the last layer's output, the input of the final norm), so
    ``adapter.unembed(head_i(h_t))`` are its logits over the shared unembedding (Gloeckle et al. 2024).

    Args:
        adapter: a causal LM.
        n: number of extra heads (``n >= 1``).
        hidden_layer: the trunk layer whose output the heads read (negative counts from the end).
        intermediate_size: MLP width (default ``d``).
        zero_init: heads start as the identity (draft the model's own next token).
        seed: head ``i`` is initialised with seed ``seed + i``.
        prefix: name prefix.
        dtype: dtype of the heads (default fp32 parameters; the hooked tensor is cast to it).

    Returns:
        the heads, in offset order.

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> hs = add_mtp_heads(ad, 3)
        >>> [h.offset for h in hs], [h.name for h in mtp_heads(ad)]
        ([2, 3, 4], ['mtp2', 'mtp3', 'mtp4'])
    """
    if not isinstance(adapter, ModelAdapter):
        raise TypeError(f"adapter must be a ModelAdapter, got {type(adapter).__name__}")
    if not adapter.is_causal or adapter.structure.lm_head is None:
        raise ValueError("multi-token prediction heads need a causal LM with an LM head")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1 (the number of extra heads), got {n!r}")
    at = resolve_hook_point(adapter, f"layers.{int(hidden_layer)}.resid_post")
    d = adapter.structure.hidden_size
    out = []
    for i in range(2, n + 2):
        head = MTPHead(d, intermediate_size, offset=i, zero_init=zero_init, seed=seed + i)
        add_head(adapter, f"{prefix}{i}", head, at, dtype=dtype)
        out.append(head)
    return out


def mtp_heads(adapter: ModelAdapter, prefix: str | None = None) -> list[Head]:
    """The attached :class:`MTPHead` heads, sorted by offset (optionally only names starting with ``prefix``).

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> _ = add_mtp_heads(ad, 2)
        >>> [(h.name, h.at) for h in mtp_heads(ad)]
        [('mtp2', 'layers.1.resid_post'), ('mtp3', 'layers.1.resid_post')]
    """
    hs = [h for h in heads(adapter).values() if isinstance(h.module, MTPHead)]
    if prefix is not None:
        hs = [h for h in hs if h.name.startswith(prefix)]
    return sorted(hs, key=lambda h: h.module.offset)


# -- the loss -------------------------------------------------------------------------------------------
HeadLike = Callable[[torch.Tensor], torch.Tensor]


def _chunk_nll(
    head: HeadLike | None, unembed: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    x = h if head is None else head(h)
    z = unembed(x)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    lsm = torch.log_softmax(z, -1)
    return -lsm.gather(-1, y[:, None])[:, 0].sum()


def _has_params(obj: Any) -> bool:
    return isinstance(obj, nn.Module) and any(p.requires_grad for p in obj.parameters())


def _offset_losses(
    hidden: torch.Tensor,
    heads_: Sequence[HeadLike | None],
    offsets: Sequence[int],
    unembed: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    source_mask: torch.Tensor,
    chunk: int,
) -> tuple[list[torch.Tensor], list[int]]:
    """Per head: (mean CE over its valid positions, number of valid positions)."""
    B, T = input_ids.shape
    dev = hidden.device
    ids = input_ids.to(dev).long()
    tm, sm = target_mask.to(dev).bool(), source_mask.to(dev).bool()
    losses, counts = [], []
    for head, i in zip(heads_, offsets, strict=True):
        if i >= T:
            valid = torch.zeros(B, 0, dtype=torch.bool, device=dev)
            src, tgt = hidden.new_zeros(0, hidden.shape[-1]), ids.new_zeros(0)
        else:
            valid = sm[:, : T - i] & tm[:, i:]  # source t real, target x_{t+i} scored
            src = hidden[:, : T - i][valid]
            tgt = ids[:, i:][valid]
        N = int(src.shape[0])
        counts.append(N)
        if N == 0:
            losses.append(hidden.sum() * 0.0)  # keeps the graph; contributes nothing
            continue
        train = torch.is_grad_enabled() and (src.requires_grad or _has_params(head) or _has_params(unembed))
        total = None
        for s in range(0, N, chunk):
            hc, yc = src[s : s + chunk], tgt[s : s + chunk]
            if train:
                part = checkpoint(_chunk_nll, head, unembed, hc, yc, use_reentrant=False)
            else:
                part = _chunk_nll(head, unembed, hc, yc)
            total = part if total is None else total + part
        losses.append(total / N)  # type: ignore[operator]
    return losses, counts


def multi_token_loss(
    trunk_hidden: torch.Tensor,
    heads: Sequence[HeadLike | None],
    unembed: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    n: int | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    chunk: int = 1024,
    return_per_head: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Multi-token prediction loss (Gloeckle et al. 2024, METHODS.md OPT-B6):

        L = Σ_{i=1..n} w_i · CE_i,   CE_i = −(1/|V_i|) Σ_{(b,t)∈V_i} log softmax(W_U · head_i(h_{b,t}))[x_{b,t+i}]

    with ``V_i = {(b, t): t + i < T, attention_mask[b, t], mask[b, t+i]}``: positions whose target lies past
    the end of the row, padding sources and unscored targets do not contribute. ``w_i = 1`` by default (the
    paper's plain sum). A head with no valid position contributes 0. The logits are computed ``chunk`` rows
    at a time (under autograd each chunk is recomputed in the backward via ``torch.utils.checkpoint``), so no
    ``[n, B, T, V]`` — nor even one ``[B·T, V]`` — tensor is ever held.

    Args:
        trunk_hidden: ``[B, T, d]`` shared trunk states ``h_t`` (with grad for training).
        heads: ``heads[i-1]`` maps ``h_t`` to the input of the unembedding for offset ``i``; ``None`` is the
            identity (the model's own next-token head when ``unembed`` is the model's unembedding).
        unembed: the shared unembedding ``W_U`` (e.g. ``adapter.unembed``), ``[N, d] -> [N, V]``.
        input_ids: ``[B, T]`` the tokens (targets are ``x_{t+i}``, unshifted).
        mask: ``[B, T]`` bool, True where a token may be a target (default: all).
        n: number of heads to use (the first ``n``; default ``len(heads)``).
        attention_mask: ``[B, T]``, 1 where ``h_t`` comes from a real token (default: all).
        weights: ``[n]`` per-head weights ``w_i`` (default 1).
        chunk: rows per logits chunk.
        return_per_head: also return ``[n]`` per-head CEs (detached).

    Returns:
        the scalar loss (dtype of the logits, at least fp32), and with ``return_per_head`` the ``[n]``
        per-head CEs.

    Raises:
        ValueError: shapes disagree, ``n`` is not in ``1..len(heads)``, wrong number of weights, ``chunk < 1``.
        TypeError: a head is not callable, or ``input_ids`` is not integer.

    Examples:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> h, W = torch.randn(2, 5, 4, generator=g), torch.randn(7, 4, generator=g)
        >>> ids = torch.randint(0, 7, (2, 5), generator=g)
        >>> unembed = lambda x: x @ W.T
        >>> l1 = multi_token_loss(h, [None], unembed, ids)         # n = 1: next-token CE
        >>> ce = torch.nn.functional.cross_entropy(unembed(h[:, :-1]).reshape(-1, 7), ids[:, 1:].reshape(-1))
        >>> bool(torch.allclose(l1, ce))
        True
        >>> loss, per = multi_token_loss(h, [None, torch.nn.Identity()], unembed, ids, chunk=3, return_per_head=True)
        >>> per.shape
        torch.Size([2])
    """
    if not isinstance(trunk_hidden, torch.Tensor) or trunk_hidden.dim() != 3:
        raise ValueError(
            f"trunk_hidden must be a [B, T, d] tensor, got {getattr(trunk_hidden, 'shape', type(trunk_hidden))}"
        )
    B, T = trunk_hidden.shape[:2]
    if not isinstance(input_ids, torch.Tensor) or input_ids.shape != (B, T):
        raise ValueError(
            f"input_ids must be [B, T] = {(B, T)}, got {getattr(input_ids, 'shape', type(input_ids))}"
        )
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    heads = list(heads)
    if not heads:
        raise ValueError("heads is empty; give at least the next-token head (None = identity)")
    for j, hd in enumerate(heads):
        if hd is not None and not callable(hd):
            raise TypeError(f"heads[{j}] must be callable (an nn.Module) or None, got {type(hd).__name__}")
    if not callable(unembed):
        raise TypeError("unembed must be callable [N, d] -> [N, V], e.g. adapter.unembed")
    n = len(heads) if n is None else int(n)
    if not 1 <= n <= len(heads):
        raise ValueError(f"n={n} must be in 1..len(heads)={len(heads)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    tm = torch.ones(B, T, dtype=torch.bool) if mask is None else mask
    sm = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask
    for nm, m in (("mask", tm), ("attention_mask", sm)):
        if tuple(m.shape) != (B, T):
            raise ValueError(f"{nm} must be [B, T] = {(B, T)}, got {tuple(m.shape)}")
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries for n={n} heads")
    losses, _ = _offset_losses(
        trunk_hidden, heads[:n], list(range(1, n + 1)), unembed, input_ids, tm, sm, chunk
    )
    total = sum(wi * li for wi, li in zip(w, losses, strict=True))
    assert isinstance(total, torch.Tensor)
    if return_per_head:
        return total, torch.stack([x.detach() for x in losses])
    return total


def _ids_and_mask(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of what ``adapter.as_batch`` returned (an EncodedBatch or a dict)."""
    if isinstance(batch, dict):
        ids = batch["input_ids"]
        return ids, batch.get("attention_mask", torch.ones_like(ids))
    return batch.input_ids, batch.attention_mask


def _inputs_and_masks(adapter: ModelAdapter, inputs: Any, target_mask: torch.Tensor | None):
    batch = adapter.as_batch(inputs)
    ids, am = _ids_and_mask(batch)
    if target_mask is None:
        tm = getattr(batch, "target_mask", None)
        tm = tm.bool() if tm is not None and bool(tm.any()) else am.bool()
    else:
        tm = target_mask.bool()
    return batch, ids, am, tm


def mtp_loss(
    adapter: ModelAdapter,
    inputs: Any,
    heads: Sequence[str | Head] | None = None,
    *,
    target_mask: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    chunk: int = 1024,
    return_per_head: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The multi-token loss of a model with attached :class:`MTPHead` heads (Gloeckle et al. 2024):

        L = CE(W_U · h^L_t, x_{t+1}) + Σ_{i≥2} CE(W_U · head_i(h_t), x_{t+i})

    where ``h^L`` is the last layer's output (the model's own next-token head, unchanged) and ``h_t`` the
    heads' trunk layer (the same tensor with the default ``hidden_layer=-1``). One forward (its LM head runs
    on one position per row: ``logits_to_keep=1``), then :func:`multi_token_loss`. Gradients reach the heads
    and the trunk.

    Args:
        adapter: the model with heads from :func:`add_mtp_heads`.
        inputs: anything :meth:`ModelAdapter.forward` takes (an :class:`EncodedBatch` is usual).
        heads: names or :class:`Head` s of the extra heads, in offset order, with consecutive offsets
            ``2, 3, …`` (default: :func:`mtp_heads`).
        target_mask: ``[B, T]`` tokens that may be targets (default: the batch's target mask when it has
            one, else every real token).
        weights: per-head weights, head 1 first.
        chunk: rows per logits chunk.
        return_per_head: also return per-head CEs (head 1 first).

    Examples:
        >>> import tokensmith as ts
        >>> ad = ts.tiny("llama")
        >>> _ = add_mtp_heads(ad, 2)
        >>> loss, per = mtp_loss(ad, ad.encode_batch(["a b c d e", "f g"]), return_per_head=True)
        >>> per.shape
        torch.Size([3])
    """
    hs = _resolve_heads(adapter, heads)
    if not hs:
        raise ValueError("no extra heads attached: call add_mtp_heads(adapter, n) first (or pass heads=)")
    offsets = [getattr(h.module, "offset", k + 2) for k, h in enumerate(hs)]
    if offsets != list(range(2, len(hs) + 2)):
        raise ValueError(f"heads must predict consecutive offsets 2, 3, ... in order; got offsets {offsets}")
    batch, ids, am, tm = _inputs_and_masks(adapter, inputs, target_mask)
    last = f"layers.{adapter.structure.num_layers - 1}.resid_post"
    points = sorted({last, *(h.at for h in hs)})
    with adapter.hooks(cache=points, detach=False) as sess:
        adapter.forward(batch, logits_to_keep=1)  # ignored by models without logits_to_keep
    n = len(hs) + 1
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(
            f"weights has {len(w)} entries for {n} heads (head 1 = the model's own, then {len(hs)} extra)"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    h_last = sess.cache[last]
    l1, _ = _offset_losses(h_last, [None], [1], adapter.unembed, ids, tm, am, chunk)
    losses = list(l1)
    for h in hs:
        li, _ = _offset_losses(
            sess.cache[h.at], [h.module], [h.module.offset], adapter.unembed, ids, tm, am, chunk
        )
        losses += li
    total = sum(wi * li for wi, li in zip(w, losses, strict=True))
    assert isinstance(total, torch.Tensor)
    if return_per_head:
        return total, torch.stack([x.detach() for x in losses])
    return total


# -- self-speculative decoding --------------------------------------------------------------------------
@dataclass
class SpeculativeResult:
    """Output of :func:`self_speculative_generate` (one entry per prompt row).

    Attributes:
        sequences: per row, the unpadded prompt followed by the new tokens.
        new_tokens: per row, the generated ids (stopping at EOS, EOS kept), as ``adapter.generate``.
        texts: decoded new text per row (special tokens skipped).
        accepted: per row, drafts accepted at each verification forward.
        drafted: per row, drafts proposed at each verification forward (fewer near ``max_new_tokens``).
        forward_calls: per row, model forwards (the prefill included).
    """

    sequences: list[torch.Tensor]
    new_tokens: list[torch.Tensor]
    texts: list[str]
    accepted: list[list[int]] = field(default_factory=list)
    drafted: list[list[int]] = field(default_factory=list)
    forward_calls: list[int] = field(default_factory=list)

    @property
    def mean_accepted(self) -> float:
        """Mean drafts accepted per verification forward, over all rows."""
        steps = [a for row in self.accepted for a in row]
        return float(sum(steps) / len(steps)) if steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / proposed drafts."""
        d = sum(sum(r) for r in self.drafted)
        return float(sum(sum(r) for r in self.accepted) / d) if d else 0.0

    @property
    def tokens_per_call(self) -> float:
        """New tokens per model forward (plain greedy decoding: 1 per forward)."""
        calls = sum(self.forward_calls)
        return float(sum(len(t) for t in self.new_tokens) / calls) if calls else 0.0


def _resolve_heads(adapter: ModelAdapter, hs: Any) -> list[Head]:
    if hs is None:
        return mtp_heads(adapter)
    attached = heads(adapter)
    out = []
    for k, h in enumerate(hs):
        if isinstance(h, Head):
            out.append(h)
        elif isinstance(h, str):
            if h not in attached:
                raise ValueError(f"no head named {h!r} is attached (attached: {list(attached)})")
            out.append(attached[h])
        elif isinstance(h, nn.Module):
            found = [x for x in attached.values() if x.module is h]
            if not found:
                raise ValueError(
                    f"heads[{k}] is a module that is not attached; attach it with add_head(adapter, name, module, at) "
                    "so its hook point is known"
                )
            out.append(found[0])
        else:
            raise TypeError(
                f"heads[{k}] must be a head name, a Head or an attached nn.Module, got {type(h).__name__}"
            )
    return out


def _crop(cache: Any, length: int, remove: int, full_only: bool) -> Any:
    """The cache holding its first ``length`` columns (``remove`` = columns to drop from the end)."""
    if full_only:
        return cache if remove == 0 else kvcache.expand(cache, 1, length=length)
    cache.crop(-remove)  # transformers' rollback (record_past): trims sliding layers back to their window
    return cache


@torch.no_grad()
def self_speculative_generate(
    adapter: ModelAdapter,
    inputs: Any,
    max_new_tokens: int = 32,
    heads: Sequence[str | Head | nn.Module] | None = None,
    *,
    outputs: str = "hidden",
    progress: bool = True,
) -> SpeculativeResult:
    """Greedy decoding that drafts with the extra heads and verifies with the base model (DEC-4).

    Blockwise parallel decoding (Stern et al. 2018) with greedy acceptance, as in Gloeckle et al. 2024 §
    self-speculative decoding and Medusa: at each step, with ``h`` the trunk state at the last accepted
    token, ``y_1 = argmax W_U·h^L`` (the base model) and ``d_i = argmax W_U·head_i(h)`` for the heads
    ``i = 2 … k+1``; one cached forward of ``[y_1, d_2, …, d_{k+1}]`` gives the base model's greedy tokens
    ``g_0 … g_k``; the accepted length is ``a = max{j : d_{i+2} = g_i for all i < j}``, the step emits
    ``y_1, d_2, …, d_{a+1}`` and ``g_a`` becomes the next ``y_1``. Each step costs one forward and emits
    ``a + 1`` tokens, all of them the base model's greedy tokens, so the output equals
    ``adapter.generate(inputs, max_new_tokens, do_sample=False)`` (up to argmax ties broken differently by
    the fp32 rounding of a multi-token forward, as between HF's own cached and uncached decoding).

    KV cache: :mod:`tokensmith.models.kvcache` (``extend``); rejected drafts are cropped by rebuilding the cache
    (``kvcache.expand(cache, 1, length)``) on full-attention caches, and with transformers' own rollback
    (``activate_past_recording`` + ``crop``) on caches with sliding-window layers (Gemma-2/3); caches of
    recurrent/SSM layers cannot be rolled back and raise.

    Batches: rows are decoded one after another (each with its own cache); there is no batched
    verification (rows accept different lengths, which would need ragged caches).

    Args:
        adapter: a causal LM.
        inputs: prompts (text, :class:`Encoded`, a list, an :class:`EncodedBatch` or id tensors).
        max_new_tokens: budget per row.
        heads: the drafting heads in offset order (names, :class:`Head` s or attached modules); default
            :func:`mtp_heads`. Head ``j`` (0-based) drafts offset ``j + 2``; no heads = plain greedy.
        outputs: ``"hidden"`` — a head returns a trunk state that ``adapter.unembed`` maps to logits
            (:class:`MTPHead`); ``"logits"`` — a head returns ``[.., V]`` logits itself.
        progress: tqdm bar over generated tokens.

    Returns:
        :class:`SpeculativeResult` with the tokens and the acceptance statistics (``mean_accepted``,
        ``acceptance_rate``, ``tokens_per_call``, ``forward_calls``).

    Examples:
        >>> import torch, tokensmith as ts
        >>> ad = ts.tiny("gpt2")
        >>> _ = add_mtp_heads(ad, 3, zero_init=False, seed=1)        # untrained heads: few drafts accepted
        >>> res = self_speculative_generate(ad, "Hello", max_new_tokens=6, progress=False)
        >>> bool(torch.equal(res.new_tokens[0], ad.generate("Hello", max_new_tokens=6).new_tokens[0]))
        True
        >>> res.forward_calls[0] <= 6
        True
    """
    from tqdm.auto import tqdm

    if not isinstance(adapter, ModelAdapter):
        raise TypeError(f"adapter must be a ModelAdapter, got {type(adapter).__name__}")
    if not (adapter.is_causal and adapter.structure.lm_head is not None):
        raise ValueError("self_speculative_generate needs a causal LM with an LM head")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if outputs not in ("hidden", "logits"):
        raise ValueError(f"outputs must be 'hidden' (fed to adapter.unembed) or 'logits', got {outputs!r}")
    hs = _resolve_heads(adapter, heads)
    batch = adapter.as_batch(inputs)
    ids_all, am_all = _ids_and_mask(batch)
    eos = getattr(adapter.tokenizer, "eos_token_id", None)
    points = sorted({h.at for h in hs})
    store: dict[str, torch.Tensor] = {}

    def grab(name: str):
        def fn(t: torch.Tensor, ctx: Any) -> None:
            store[name] = t
            return None

        return fn

    res = SpeculativeResult([], [], [])
    bar = tqdm(total=max_new_tokens * ids_all.shape[0], disable=not progress, desc="self-speculative")
    try:
        with adapter.hooks(edit=[(p, grab(p)) for p in points]):
            for b in range(ids_all.shape[0]):
                prompt = ids_all[b][am_all[b].bool()].to(adapter.device)[None]
                P = int(prompt.shape[1])
                adapter.check_length(P + max_new_tokens, "the prompt plus max_new_tokens")
                out = adapter.forward({"input_ids": prompt}, use_cache=True, logits_to_keep=1)
                cache = _cache_of(out)
                if cache is None:
                    raise ValueError(
                        "this model returned no KV cache; self-speculative decoding needs use_cache"
                    )
                kind = kvcache.cache_kind(cache)
                full_only = kind == "dynamic"
                if not full_only:
                    if not hasattr(cache, "activate_past_recording") or not hasattr(cache, "crop"):
                        raise ValueError(
                            f"this model's cache ({kind}) cannot be rolled back after rejected drafts with the installed "
                            "transformers; use plain adapter.generate"
                        )
                    cache.activate_past_recording()
                calls, accepted, drafted = 1, [], []
                gen = [int(out.logits[0, -1].argmax())]
                trunk = {p: store[p][0, -1] for p in points}
                past = P
                bar.update(1)
                while len(gen) < max_new_tokens and not (eos is not None and gen[-1] == eos):
                    k = min(len(hs), max_new_tokens - len(gen) - 1)
                    outs = [
                        h.module(trunk[h.at][None].to(_dtype_of(h.module, trunk[h.at])))[-1] for h in hs[:k]
                    ]
                    drafts: list[int] = []
                    if outs and outputs == "hidden":  # one unembedding call for all heads: W_U is read once
                        drafts = adapter.unembed(torch.stack(outs).to(adapter.dtype)).argmax(-1).tolist()
                    elif outs:
                        drafts = [int(z.argmax()) for z in outs]
                    feed = torch.tensor([[gen[-1], *drafts]], device=adapter.device)
                    out = kvcache.extend(adapter, cache, past, feed)
                    calls += 1
                    newer = _cache_of(out)
                    cache = newer if newer is not None else cache
                    g = out.logits[0].argmax(-1).tolist()
                    a = 0
                    while a < k and g[a] == drafts[a]:
                        a += 1
                    accepted.append(a)
                    drafted.append(k)
                    new = drafts[:a] + [g[a]]
                    cache = _crop(cache, past + 1 + a, k - a, full_only)
                    past += 1 + a
                    trunk = {p: store[p][0, a] for p in points}
                    before = len(gen)
                    for t in new:
                        gen.append(t)
                        if eos is not None and t == eos:
                            break
                    bar.update(len(gen) - before)
                gen = gen[:max_new_tokens]
                row = torch.tensor(gen, dtype=torch.long)
                res.sequences.append(torch.cat([prompt[0].cpu(), row]))
                res.new_tokens.append(row)
                res.texts.append(adapter.tokenizer.decode(row, skip_special_tokens=True))
                res.accepted.append(accepted)
                res.drafted.append(drafted)
                res.forward_calls.append(calls)
    finally:
        bar.close()
    return res


def _cache_of(out: Any) -> Any:
    for name in ("cache", "past_key_values"):  # transformers >= 5.x names it `cache`
        c = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if c is not None:
            return c
    return None


def _dtype_of(module: nn.Module, like: torch.Tensor) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return like.dtype
