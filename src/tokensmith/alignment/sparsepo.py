"""Learned SparsePO masks read from the reference model's hidden states (Christopoulou et al. 2024).

SparsePO weights each token's reward and KL term with masks m_u, m_d ≥ 0 predicted from the **reference**
model's hidden states (the reference is frozen, so the masks depend on the text, not on the moving policy):

    m_t = ReLU(Σ_l a_l · ReLU(w_l · LN_l(h^ref_{l, t−1}) + b_l))        (:class:`~tokensmith.alignment.losses.MaskModel`)

where h^ref_{l, t−1} is layer l's output at the position that *predicts* token y_t (the same alignment as the
per-token log-probs). :class:`SparsePOMasks` owns one mask network for the reward and one for the KL
(``shared=True``: the paper's "common mask"), reads the hidden states through ``adapter.hooks`` at the
completion positions only (``[N, d]`` per layer, never the full ``[B, T, d]`` of every layer), and is the
``masks`` callable of ``loss="sparsepo"`` in :class:`~tokensmith.alignment.TokenPreferenceTrainer`, which
trains its parameters with the policy's (same optimizer, saved with checkpoints).

Examples:
    >>> import tokensmith as ts
    >>> from tokensmith.alignment.sparsepo import SparsePOMasks
    >>> ref = ts.tiny("llama")
    >>> masks = SparsePOMasks(ref, layers=[-1])
    >>> from tokensmith.alignment.data import encode_pairs
    >>> pb = encode_pairs(ref, [{"prompt": "Hi", "chosen": " yes please", "rejected": " no"}], chat=False)
    >>> m_u_w, m_u_l, m_d_w, m_d_l = masks.from_batch(pb)
    >>> m_u_w.shape == pb.mask_w.shape and bool((m_u_w[~pb.mask_w] == 0).all())
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tokensmith.alignment.data import PreferenceBatch
from tokensmith.alignment.losses import MaskModel
from tokensmith.models import ModelAdapter
from tokensmith.models.logprobs import shift_target_mask

__all__ = ["SparsePOMasks"]


class SparsePOMasks(nn.Module):
    """Reward and KL token masks for SparsePO from reference hidden states.

    Args:
        reference: the frozen reference model whose hidden states the masks read.
        layers: which layers' outputs (``layers.{i}.resid_post``; negative counts from the end). Default: every
            layer, as in the paper.
        shared: one network for both masks (m_u = m_d, the paper's common mask).
        init_bias: initial bias of each layer's projection; positive starts with dense masks (m ≈ 1 when the
            mixing weights sum to 1).

    Call it on the trainer's :class:`~tokensmith.alignment.trainer.LossInputs` (or use :meth:`from_batch`):
    returns ``(m_u_w, m_u_l, m_d_w, m_d_l)``, each ``[B, T]`` and zero outside the completion masks.
    """

    def __init__(
        self,
        reference: ModelAdapter,
        layers: Sequence[int] | None = None,
        *,
        shared: bool = False,
        init_bias: float = 1.0,
    ) -> None:
        super().__init__()
        n = reference.structure.num_layers
        idx = list(range(n)) if layers is None else [int(i) for i in layers]
        bad = [i for i in idx if not -n <= i < n]
        if bad or not idx:
            raise ValueError(f"layers must be non-empty indices in [-{n}, {n}); got {list(layers or [])}")
        self.layers = sorted({i % n for i in idx})
        self.shared = shared
        self._reference = [reference]  # not a submodule: its weights are frozen and not ours to save
        d = reference.structure.hidden_size
        self.reward = MaskModel(d, len(self.layers), init_bias=init_bias)
        self.kl = self.reward if shared else MaskModel(d, len(self.layers), init_bias=init_bias)

    @property
    def reference(self) -> ModelAdapter:
        return self._reference[0]

    def hidden(self, pb: PreferenceBatch) -> list[torch.Tensor]:
        """Reference hidden states at the positions predicting each completion token: ``[N, d]`` per layer."""
        ref = self.reference
        keep = shift_target_mask(pb.batch.target_mask)
        names = [f"layers.{i}.resid_post" for i in self.layers]
        with torch.no_grad(), ref.eval_mode(), ref.hooks(cache=names, cache_positions=keep) as h:
            ref.forward(pb.batch, logits_to_keep=1)
        return [h.cache[n] for n in names]

    def from_batch(self, pb: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four masks for an encoded preference batch."""
        dev = next(self.parameters()).device
        hs = [x.to(dev)[None] for x in self.hidden(pb)]  # [1, N, d]: MaskModel is position-wise
        tm = pb.batch.target_mask.to(dev).bool()
        u = self.reward(hs)[0]
        dv = u if self.shared else self.kl(hs)[0]

        def place(vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return pb.split(torch.zeros(tm.shape, dtype=vals.dtype, device=dev).masked_scatter(tm, vals))

        (u_w, u_l), (d_w, d_l) = place(u), place(dv)
        return u_w, u_l, d_w, d_l

    def forward(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for the trainer's ``LossInputs`` (uses its ``pb``)."""
        pb = inputs.pb if hasattr(inputs, "pb") else inputs
        if not isinstance(pb, PreferenceBatch):
            raise TypeError(f"SparsePOMasks takes LossInputs or a PreferenceBatch, got {type(inputs).__name__}")
        return self.from_batch(pb)
