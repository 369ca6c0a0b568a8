"""Norm-based decomposition rollout: GlobEnc (Modarressi et al., 2022) and ALTI (Ferrando et al., 2022).

Each attention layer's output at position ``i`` is split exactly into one vector per source token ``j``
(Kobayashi et al., 2021):

    z_{i←j} = Σ_h α^h_ij f^h(x_j) + [i = j]·x_i,     f^h(x_j) = v^{g(h)}_j W_O^h

(``v`` the value projection output, value bias included; ``W_O^h`` the head's rows of the output projection;
``g(h)`` its KV group), so that ``y_i = Σ_j z_{i←j} + b_i`` where ``b_i`` collects the terms that belong to
no token (the output-projection bias ``b_O`` and the norm's ``β``). Where the norm sits decides the rest
(found per layer by :func:`tokensmith.models.norms.attention_norms`, never by architecture name):

- **pre-LN / pre-RMSNorm decoders** (Llama, Qwen2, GPT-2, GPT-NeoX incl. its parallel residual): the norm is
  on the block's *input*, inside ``f^h(x_j) = Norm(x_j)W_V^h W_O^h``, a function of ``x_j`` alone — nothing to
  linearise. ``y_i = x_i + attn.out_i`` (the residual stream after the attention branch; GPT-NeoX's parallel
  MLP branch is ignored), ``b_i = b_O``.
- **post-attention ("sandwich") norm** (Gemma 2/3: ``y = x + N(attn(x))``): ``N`` is linearised at the
  statistics of the attention output ``a_i`` it normalises, ``N(a_i) = Σ_j γ⊙C(ẑ_j)/s(a_i) + γ⊙C(b_O)/s(a_i)``
  (``ẑ_j`` the attention term above, ``C`` the centring of a LayerNorm or the identity of an RMSNorm);
  the residual ``x_i`` is added after the norm; ``b_i = γ⊙C(b_O)/s(a_i) + β``.
- **post-LN encoders** (BERT: ``y = LN(x + attn(x))``, "LN #1"): the LN is linearised at the statistics of
  its own input ``u_i = x_i + a_i``: ``z_{i←j} = γ⊙C(ẑ_j + [i = j]x_i)/s(u_i)``, ``b_i = γ⊙C(b_O)/s(u_i) + β``.
  ``β`` and ``b_O`` are attributed to no token (Kobayashi et al., 2021; ALTI).

Ignored, as in both papers: the MLP, the second residual and LN #2 — the decomposition covers the attention
block only. Layers without attention (hybrid models) are skipped (identity in the rollout).

Per-layer contribution matrices, then rows normalised to 1:

- GlobEnc: ``N_ij = ‖z_{i←j}‖₂``;
- ALTI: ``c_ij = max(0, ‖y_i‖₁ − ‖y_i − z_{i←j}‖₁)`` (Manhattan proximity of each transformed vector to
  the output; ``y_i`` the actual block output, biases included).

Rolled out like attention rollout but without the added identity (the residual is inside ``z_{i←i}``):
``R = Ĉ_L ⋯ Ĉ_1``, ``s_tj = R[q_t, j]`` at the query ``q_t = p_t − 1`` predicting row ``t``'s token.
Rows of ``R`` sum to 1; ``R`` is lower-triangular for a causal model.

Examples:
    >>> import tokensmith as ts
    >>> from tokensmith.attribution import attribute
    >>> import tokensmith.attribution.decomposition
    >>> r = attribute(ts.tiny("llama"), "The capital of France is", target=" Paris", method="alti")
    >>> abs(sum(r.extra["row_sums"]) - 1.0) < 1e-6
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.attribution.base import AttributionMethod, MethodOutput, register_method
from tokensmith.attribution.internals import (
    _attention_layers,
    mix_sources,
    output_projection,
    query_rows,
    value_outputs,
)
from tokensmith.attribution.targets import AttributionProblem
from tokensmith.models.norms import attention_norms, norm_form

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = [
    "LayerRecord",
    "LayerDecomposition",
    "capture_layers",
    "decompose_layer",
    "contribution_matrix",
    "DecompositionRollout",
    "GlobEnc",
    "ALTI",
]

MEASURES = ("globenc", "alti")


@dataclass
class LayerRecord:
    """What one forward recorded for one attention layer of one sequence (CPU)."""

    layer: int
    probs: torch.Tensor  # [H, L, L]
    v: torch.Tensor  # [L, H_kv·d_head]
    resid_pre: torch.Tensor  # [L, d]
    attn_out: torch.Tensor  # [L, d] (output projection incl. its bias)
    parts: Any = field(default=None, repr=False)  # (f, b_O, norms), filled by the first decompose_layer


@dataclass
class LayerDecomposition:
    """``y_i = Σ_j vectors[i, j] + bias[i]`` for the query rows ``rows`` (float64).

    Attributes:
        layer: the layer.
        rows: ``[Q]`` the query positions decomposed.
        vectors: ``[Q, L, d]`` the per-source vectors ``z_{i←j}``.
        bias: ``[Q, d]`` the terms attributed to no token (``b_O`` through the norm, ``β``).
        placement: ``"pre"`` (norm inside ``f``), ``"post"`` (norm on the attention output) or
            ``"post_residual"`` (norm on the residual sum), ``"none"`` (no norm at this block).
        residual: whether ``x_i`` was added to ``z_{i←i}``.
    """

    layer: int
    rows: torch.Tensor
    vectors: torch.Tensor
    bias: torch.Tensor
    placement: str
    residual: bool

    @property
    def output(self) -> torch.Tensor:
        """``[Q, d]`` the block output the vectors decompose."""
        return self.vectors.sum(1) + self.bias


def _check_decomposable(adapter: ModelAdapter, layers: Sequence[int], why: str) -> None:
    feats = adapter.capabilities()["features"]
    if not feats.get("attention_probe"):
        raise ValueError(f"{why} needs the attention probabilities, but {adapter.name!r} has no discoverable "
                         "attention (capabilities()['features']['attention_probe'] is False); pass "
                         "AdapterSpec(attn=...) or use a gradient/perturbation method")
    names = set(adapter.hook_names())
    for i in layers:
        output_projection(adapter, i)
        for n in (f"layers.{i}.attn.v", f"layers.{i}.attn.out"):
            if n not in names:
                raise ValueError(f"{why} needs the {n!r} hook, which {adapter.name!r} does not offer; use "
                                 "'attention_rollout' or a gradient method")


def capture_layers(
    adapter: ModelAdapter, ids: torch.Tensor, layers: Sequence[int], extra: Sequence[str] = ()
) -> tuple[dict[int, LayerRecord], dict[str, torch.Tensor]]:
    """One forward of one sequence (``ids [L]``) recording, per attention layer, what :func:`decompose_layer`
    needs (attention probabilities, value projection, residual input, attention output), plus the hook points
    ``extra`` (returned as ``{name: [L, ...]}`` float64 on the CPU)."""
    names = [f"layers.{i}.{p}" for i in layers for p in ("attn.v", "resid_pre", "attn.out")]
    names += [n for n in extra if n not in names]
    with torch.no_grad(), adapter.capture_attention(layers=list(layers)) as att, adapter.hooks(cache=names) as h:
        adapter.forward(ids[None])
    c = {n: h.cache[n][0].double().cpu() for n in names}
    recs = {
        i: LayerRecord(i, att[i][0].double().cpu(), c[f"layers.{i}.attn.v"], c[f"layers.{i}.resid_pre"],
                       c[f"layers.{i}.attn.out"])
        for i in layers
    }
    return recs, {n: c[n] for n in extra}


def decompose_layer(
    adapter: ModelAdapter, rec: LayerRecord, rows: torch.Tensor | None = None, residual: bool = True
) -> LayerDecomposition:
    """Split layer ``rec.layer``'s attention-block output at the query ``rows`` into per-source vectors
    (module docstring). ``residual=False`` leaves ``x_i`` out (the attention branch's update only, as direct
    logit attribution wants); it requires a pre-norm or post-attention-norm block.

    Raises:
        ValueError: the recorded attention output is not ``Σ_j α_ij v_j W_O + b_O`` (an attention with a part
            the decomposition does not model, e.g. an output gate), or ``residual=False`` on a post-LN block.
    """
    i = rec.layer
    L = rec.resid_pre.shape[0]
    rows = torch.arange(L) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    f, b_o, norms = _layer_parts(adapter, rec)
    z = mix_sources(rec.probs[:, rows], f)  # [Q, L, d] attention part, no bias
    d = z.shape[-1]
    Q = rows.numel()
    a = rec.attn_out[rows]
    err = float((z.sum(1) + b_o - a).norm() / a.norm().clamp_min(1e-30))
    dt = next(adapter.model.parameters()).dtype
    if err > max(1e-3, 32 * torch.finfo(dt).eps):
        raise ValueError(f"layer {i}: the attention output is not Σ_j α_ij·v_j·W_O + b_O (relative error {err:.2g}); "
                         "this attention has a part the decomposition does not model (e.g. an output gate)")
    bias = b_o.expand(Q, d).clone()
    diag = torch.arange(Q)
    if norms.post_residual is not None:
        if not residual:
            raise ValueError(f"layer {i} normalises the residual sum (post-LN): its attention update is not "
                             "separable from the residual; decompose it with residual=True")
        nf = norm_form(norms.post_residual, d)
        z[diag, rows] += rec.resid_pre[rows]
        s = nf.scale(rec.resid_pre[rows] + a)[:, None]  # [Q, 1, 1]
        z = nf.linear(z, s)
        bias = nf.linear(bias, s[:, 0]) + nf.beta(d)
        placement = "post_residual"
    elif norms.post is not None:
        nf = norm_form(norms.post, d)
        s = nf.scale(a)[:, None]
        z = nf.linear(z, s)
        bias = nf.linear(bias, s[:, 0]) + nf.beta(d)
        if residual:
            z[diag, rows] += rec.resid_pre[rows]
        placement = "post"
    else:
        if residual:
            z[diag, rows] += rec.resid_pre[rows]
        placement = "pre" if norms.pre is not None else "none"
    return LayerDecomposition(i, rows, z, bias, placement, residual)


def _layer_parts(adapter: ModelAdapter, rec: LayerRecord) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``(f [H, L, d], b_O [d], norms)`` of one record, computed once per record (query chunks share them)."""
    if rec.parts is None:
        W, b_o = output_projection(adapter, rec.layer)
        rec.parts = (value_outputs(adapter, rec.v, W), b_o, attention_norms(adapter, rec.layer))
    return rec.parts


def contribution_matrix(dec: LayerDecomposition, measure: str) -> torch.Tensor:
    """``[Q, L]`` row-normalised contributions of one layer: GlobEnc ``‖z_{i←j}‖₂`` or ALTI
    ``max(0, ‖y_i‖₁ − ‖y_i − z_{i←j}‖₁)``."""
    if measure == "globenc":
        c = dec.vectors.norm(dim=-1)
    elif measure == "alti":
        y = dec.output[:, None]
        c = (y.abs().sum(-1) - (y - dec.vectors).abs().sum(-1)).clamp_min(0)
    else:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    tot = c.sum(-1, keepdim=True)
    return torch.where(tot > 0, c / tot.clamp_min(1e-300), torch.zeros_like(c))


@register_method("decomposition_rollout")
@dataclass
class DecompositionRollout(AttributionMethod):
    """GlobEnc / ALTI decomposition rollout (ATT-5; module docstring): ``R = Ĉ_L ⋯ Ĉ_1``, ``s_tj = R[q_t, j]``.

    Args:
        measure: ``"alti"`` (Ferrando et al., 2022: ``max(0, ‖y_i‖₁ − ‖y_i − z_{i←j}‖₁)``) or ``"globenc"``
            (Modarressi et al., 2022: ``‖z_{i←j}‖₂``).
        layers: attention layers to roll out (default all, in order).
        chunk: query rows decomposed at once (bounds memory to ``chunk × L × d`` floats).
    """

    measure: str = "alti"
    layers: Any = None
    chunk: int = 64
    requires = ("attention_probe",)

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:
        if self.measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {self.measure!r}")
        ad = problem.adapter
        layers = _attention_layers(problem, self.layers)
        _check_decomposable(ad, layers, f"method {self.name!r}")
        recs, _ = capture_layers(ad, problem.ids, layers)
        L = len(problem.encoded)
        R = torch.eye(L, dtype=torch.float64)
        for i in layers:
            C = torch.cat([
                contribution_matrix(decompose_layer(ad, recs[i], torch.arange(a, min(a + self.chunk, L))), self.measure)
                for a in range(0, L, self.chunk)
            ])
            R = C @ R
        q = query_rows(problem)
        return MethodOutput(R[q].float(), extra={"layers": layers, "measure": self.measure,
                                                 "row_sums": R[q].sum(-1).tolist()})


@register_method("alti")
@dataclass
class ALTI(DecompositionRollout):
    """ALTI (Ferrando et al., 2022): :class:`DecompositionRollout` with ``measure="alti"``."""

    measure: str = "alti"


@register_method("globenc")
@dataclass
class GlobEnc(DecompositionRollout):
    """GlobEnc (Modarressi et al., 2022): :class:`DecompositionRollout` with ``measure="globenc"``."""

    measure: str = "globenc"
