"""Attributions read from the model's internals: attention, attention rollout, attention × value norm.

The attention probabilities come from ``adapter.capture_attention`` (eager softmax only for the layers
asked for, GQA handled; hybrids have attention only in some layers — ``capabilities()["attention_layers"]``).
Row ``t`` (the token at position ``p_t``) reads the attention of the query that predicts it, ``q = p_t − 1``.

- attention (ATT-3): ``s_ti = A^{l,h}[q, i]`` for one layer / head, or the mean over heads (and layers);
- attention rollout (ATT-4; Abnar & Zuidema, 2020): ``Â_l = rownorm(½·mean_h A_l + ½·I)``,
  ``R = Â_L ⋯ Â_1`` over the attention layers in order, ``s_ti = R[q, i]``; rows of ``R`` sum to 1 and ``R`` is
  lower-triangular for a causal model;
- attention × value norm (ATT-3; Kobayashi et al., 2020): ``s_ti = ‖Σ_h A^{l,h}[q, i] · v^{g(h)}_i W_O^h‖₂``
  — the norm of what source ``i`` adds to the attention output at ``q`` through every head (``v`` the value
  projection output, bias included; ``W_O^h`` the head's columns of the output projection; ``g(h)`` its
  KV group). The output projection's bias is shared by all sources and left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokensmith.attribution.base import AttributionMethod, MethodOutput, register_method
from tokensmith.attribution.targets import AttributionProblem

__all__ = ["Attention", "AttentionRollout", "AttentionNorm", "query_rows"]


def query_rows(problem: AttributionProblem) -> torch.Tensor:
    """The query position whose attention explains each row: ``p_t − 1`` (last position for callables)."""
    L = len(problem.encoded)
    if problem.kind == "tokens":
        return problem.target_positions - 1
    if problem.kind == "contrast":
        return torch.tensor([problem.shared - 1])
    return torch.tensor([L - 1])


def _attention_layers(problem: AttributionProblem, layers: Any) -> list[int]:
    have = problem.adapter.capabilities()["attention_layers"]
    if layers is None or layers == "all":
        return list(have)
    if isinstance(layers, int):
        layers = [layers]
    out = []
    n = problem.adapter.structure.num_layers
    for i in layers:
        j = int(i) % n
        if j not in have:
            raise ValueError(f"layer {i} has no attention; layers with attention: {have}")
        out.append(j)
    return out


def _pick(have: list[int], layer: Any) -> int:
    """A negative index counts attention layers from the end (``-1``: the last one); others are layer ids."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise TypeError(f"layer must be an int or 'mean', got {layer!r}")
    if not have:
        raise ValueError("this model has no attention layer")
    if layer < 0:
        if -layer > len(have):
            raise ValueError(f"layer {layer}: the model has {len(have)} attention layers")
        return have[layer]
    return layer


def _capture(problem: AttributionProblem, layers: list[int]) -> dict[int, torch.Tensor]:
    ad = problem.adapter
    with torch.no_grad(), ad.capture_attention(layers=layers) as att:
        ad.forward(problem.ids[None])
    return {i: att[i][0].float().cpu() for i in layers}  # [H, L, L]


@register_method("attention")
@dataclass
class Attention(AttributionMethod):
    """Raw attention (ATT-3) from the query that predicts each row's token.

    Args:
        layer: a layer index (default ``-1``: the last attention layer) or ``"mean"`` over attention layers.
        head: a head index, or None for the mean over heads.
    """

    layer: Any = -1
    head: int | None = None
    requires = ("attention_probe",)

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:
        have = problem.adapter.capabilities()["attention_layers"]
        layers = _attention_layers(problem, list(have) if self.layer == "mean" else [_pick(have, self.layer)])
        A = _capture(problem, layers)
        H = next(iter(A.values())).shape[0]
        if self.head is not None and not -H <= self.head < H:
            raise ValueError(f"head {self.head} out of range for {H} heads")
        mats = [a[self.head] if self.head is not None else a.mean(0) for a in A.values()]
        M = torch.stack(mats).mean(0)
        q = query_rows(problem)
        return MethodOutput(M[q], extra={"layers": layers, "head": self.head})


@register_method("attention_rollout", "rollout")
@dataclass
class AttentionRollout(AttributionMethod):
    """Attention rollout (ATT-4): ``R = Â_L ⋯ Â_1``, ``Â_l = rownorm(r·mean_h A_l + (1 − r)·I)``.

    Args:
        residual: the identity weight ``1 − r`` (0.5 in the paper).
        layers: attention layers to roll out (default: all of them, in order).
    """

    residual: float = 0.5
    layers: Any = None
    requires = ("attention_probe",)

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:
        if not 0.0 <= self.residual <= 1.0:
            raise ValueError("residual must lie in [0, 1]")
        layers = _attention_layers(problem, self.layers)
        A = _capture(problem, layers)
        L = len(problem.encoded)
        eye = torch.eye(L, dtype=torch.float64)
        R = eye.clone()
        for i in layers:
            a = (1 - self.residual) * A[i].double().mean(0) + self.residual * eye
            a = a / a.sum(-1, keepdim=True)
            R = a @ R
        q = query_rows(problem)
        return MethodOutput(R[q].float(), extra={"layers": layers, "residual": self.residual,
                                                 "row_sums": R[q].sum(-1).tolist()})


@register_method("attention_norm")
@dataclass
class AttentionNorm(AttributionMethod):
    """Attention × value norm (ATT-3, Kobayashi et al.): ``‖Σ_h A^h[q, i]·v_i^{g(h)} W_O^h‖₂`` at one layer.

    Args:
        layer: the layer (default ``-1``, the last attention layer).
    """

    layer: int = -1
    requires = ("attention_probe",)

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:
        ad = problem.adapter
        s = ad.structure
        have = ad.capabilities()["attention_layers"]
        li = _attention_layers(problem, [_pick(have, self.layer)])[0]
        o = s.o_proj[li]
        w = getattr(o, "weight", None) if o is not None else None
        if w is None or not s.head_dim:
            raise ValueError(f"attention_norm needs the output projection of layer {li} (not found); pass "
                             "AdapterSpec(o_proj=...) or use 'attention' / 'attention_rollout'")
        name = f"layers.{li}.attn.v"
        if name not in ad.hook_names():
            raise ValueError(f"attention_norm needs the {name!r} hook, which this model does not offer")
        with torch.no_grad(), ad.capture_attention(layers=[li]) as att, ad.hooks(cache=name) as h:
            ad.forward(problem.ids[None])
        A = att[li][0].double().cpu()  # [H, L, L]
        v = h.cache[name][0].double().cpu()  # [L, H_kv * dh]
        H, dh = A.shape[0], s.head_dim
        Hkv = v.shape[-1] // dh
        v = v.view(v.shape[0], Hkv, dh)
        W = w.detach().double().cpu()
        if W.shape[1] != H * dh:  # Conv1D (GPT-2) stores the transpose
            W = W.t()
        if W.shape[1] != H * dh:
            raise ValueError(f"output projection of layer {li} has shape {list(w.shape)}, not [d, H·d_head]")
        q = query_rows(problem)
        out = torch.zeros(len(q), v.shape[0], dtype=torch.float64)
        for r, qi in enumerate(q.tolist()):
            contrib = torch.zeros(v.shape[0], W.shape[0], dtype=torch.float64)
            for hh in range(H):
                g = hh // (H // Hkv)
                contrib += A[hh, qi, :, None] * (v[:, g] @ W[:, hh * dh : (hh + 1) * dh].t())
            out[r] = contrib.norm(dim=-1)
        return MethodOutput(out.float(), extra={"layer": li})
