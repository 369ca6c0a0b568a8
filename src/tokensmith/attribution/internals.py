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
  KV group). The output projection's bias is shared by all sources and left out. ``W_O`` is read by
  :func:`output_projection`, which decides the weight's orientation by running the module (GPT-2's
  ``Conv1D`` stores ``[in, out]``, square when ``d = H·d_head``, so shapes cannot tell).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.attribution.base import AttributionMethod, MethodOutput, register_method
from tokensmith.attribution.targets import AttributionProblem
from tokensmith.models import execution_device, is_offloaded, offloaded_value

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["Attention", "AttentionRollout", "AttentionNorm", "query_rows", "output_projection", "value_outputs", "mix_sources"]


def query_rows(problem: AttributionProblem) -> torch.Tensor:
    """The query position whose attention explains each row: ``p_t − 1`` (last position for callables)."""
    L = len(problem.encoded)
    if problem.kind == "tokens":
        return problem.target_positions - 1
    if problem.kind == "contrast":
        return torch.tensor([problem.shared - 1])
    if problem.kind == "mask":  # the masked position's own query: its output is what the MLM head reads
        return problem.target_positions.clone()
    if problem.kind == "label":  # the pooled token: [CLS] for encoders, the last token for causal classifiers
        return torch.full((problem.n_rows,), L - 1 if problem.adapter.is_causal else 0, dtype=torch.long)
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
        have = ad.capabilities()["attention_layers"]
        li = _attention_layers(problem, [_pick(have, self.layer)])[0]
        name = f"layers.{li}.attn.v"
        W, _ = output_projection(ad, li)
        if name not in ad.hook_names():
            raise ValueError(f"attention_norm needs the {name!r} hook, which this model does not offer")
        with torch.no_grad(), ad.capture_attention(layers=[li]) as att, ad.hooks(cache=name) as h:
            ad.forward(problem.ids[None])
        A = att[li][0].double().cpu()  # [H, L, L]
        f = value_outputs(ad, h.cache[name][0], W)  # [H, L, d]
        q = query_rows(problem)
        vec = mix_sources(A[:, q], f)  # [R, L, d]
        return MethodOutput(vec.norm(dim=-1).float(), extra={"layer": li})


def output_projection(adapter: ModelAdapter, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s attention output projection as ``(W [H, d_head, d], b [d])`` in float64 on the CPU:
    ``o_proj(z) = Σ_h z^h W[h] + b``.

    The orientation of the stored weight (``nn.Linear`` keeps ``[out, in]``, GPT-2's ``Conv1D`` ``[in, out]``;
    both are ``[d, d]`` when ``d = H·d_head``) is decided by running the module on a random input, not by shape.

    Raises:
        ValueError: no output projection was discovered, or it is not affine in its input.
    """
    s = adapter.structure
    o = s.o_proj[layer]
    w = getattr(o, "weight", None) if o is not None else None
    b = getattr(o, "bias", None) if o is not None else None
    dev = w.device if isinstance(w, torch.Tensor) else None
    if is_offloaded(w):  # accelerate offloaded this layer (device_map with "cpu"/"disk"): read its stored values
        path = next(n for n, m in adapter.model.named_modules() if m is o)
        w, dev = offloaded_value(adapter.model, path), execution_device(adapter.model, path)
        b = offloaded_value(adapter.model, path, "bias") if isinstance(b, torch.Tensor) else None
    H, dh = s.num_heads, s.head_dim
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not H or not dh:
        raise ValueError(f"this method needs the attention output projection of layer {layer} (not found); pass "
                         "AdapterSpec(o_proj=...) or use 'attention' / 'attention_rollout'")
    n = H * dh
    bias = b.detach().double().cpu() if isinstance(b, torch.Tensor) else None
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, n, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref = o(z.to(device=dev, dtype=w.dtype))
    ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).double().cpu()
    tol = 64 * torch.finfo(w.dtype).eps * math.sqrt(n) * float(ref.abs().max() + 1)
    W64 = w.detach().double().cpu()
    for M in (W64.t(), W64):  # [in, out]
        if M.shape[0] != n:
            continue
        bb = bias if bias is not None else torch.zeros(M.shape[1], dtype=torch.float64)
        if bb.shape[0] == M.shape[1] and float((z @ M + bb - ref).abs().max()) <= tol:
            return M.reshape(H, dh, M.shape[1]), bb
    raise ValueError(f"the output projection of layer {layer} ({type(o).__name__}, weight {list(w.shape)}) is not "
                     f"z·W + b with W of [H·d_head = {n}, d]")


def value_outputs(adapter: ModelAdapter, v: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``f^h(x_j) = v_j^{g(h)} W_O^h`` for every head and position: ``[H, L, d]`` float64.

    ``v``: the ``attn.v`` record of one sequence, ``[L, H_kv·d_head]`` (bias included); ``W`` from
    :func:`output_projection`. Query head ``h`` reads KV group ``g(h) = h // (H / H_kv)``.
    """
    H, dh, _ = W.shape
    v = v.double().cpu()
    Hkv = v.shape[-1] // dh
    if Hkv == 0 or H % Hkv or v.shape[-1] != Hkv * dh:
        raise ValueError(f"attn.v has width {v.shape[-1]}, not a multiple of d_head={dh} dividing {H} heads")
    v = v.view(v.shape[0], Hkv, dh).repeat_interleave(H // Hkv, dim=1)  # [L, H, dh]
    return torch.einsum("lhe,hed->hld", v, W)


def mix_sources(probs: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``out[q, j] = Σ_h probs[h, q, j] · f[h, j]``: ``[H, Q, L] × [H, L, d] → [Q, L, d]`` (one batched matmul
    over sources ``j``; ``einsum`` picks a far slower contraction for this pattern)."""
    return torch.bmm(probs.permute(2, 1, 0), f.permute(1, 0, 2)).permute(1, 0, 2)
