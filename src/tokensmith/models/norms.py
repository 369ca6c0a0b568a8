"""Normalisation layers as affine maps with frozen statistics, and where they sit around each attention block.

Norm-based attributions (GlobEnc, ALTI, direct logit attribution) treat a norm as linear once its statistics
are fixed at the vector it actually normalised (Kobayashi et al., 2021):

    N(u) = γ ⊙ C(u) / s(u) + β,     C(u) = u − mean(u) (LayerNorm) or u (RMSNorm),  s(u) = √(mean(C(u)²) + ε)

so ``N(u) = Σ_j γ ⊙ C(z_j) / s(u) + β`` for any split ``u = Σ_j z_j`` (``C`` is linear). :func:`norm_form`
reads ``γ``, ``β``, ``ε`` and the centring from a norm module and **checks** the form against the module on a
random input: no table of norm classes (``nn.LayerNorm``, ``LlamaRMSNorm``, Gemma's ``(1 + w)`` RMSNorm and
parameter-free norms are all recognised by what they compute).

:func:`attention_norms` finds, by one probe forward of a one-token input (cached per model), which norms sit
around layer ``i``'s attention:

- ``pre``: the norm whose output is the attention's input (pre-LN decoders: Llama, GPT-2, GPT-NeoX, Gemma);
- ``post``: a norm applied to the attention's output before the residual add (Gemma 2/3 "sandwich" norms):
  ``y = x + N(attn(x))``;
- ``post_residual``: a norm applied to ``resid_pre + attn.out`` (post-LN encoders, BERT):
  ``y = N(x + attn(x))``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokensmith.models.offload import execution_device, is_offloaded, offloaded_value
from tokensmith.models.structure import is_norm_module

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["NormForm", "norm_form", "AttentionNorms", "attention_norms"]

_EPS_NAMES = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")


@dataclass(frozen=True)
class NormForm:
    """A norm ``N(u) = γ ⊙ C(u)/s(u) + β`` (see the module docstring), float64 parameters on the CPU.

    Attributes:
        center: subtract the mean (LayerNorm) or not (RMSNorm).
        weight: the effective ``γ`` (``[d]``; Gemma's ``1 + w`` already added), or None for no scale.
        bias: ``β`` (``[d]``) or None.
        eps: ``ε`` inside the square root.

    Examples:
        >>> ln = torch.nn.LayerNorm(4)
        >>> f = norm_form(ln)
        >>> u = torch.randn(3, 4)
        >>> torch.allclose(f(u.double()), ln(u).double(), atol=1e-6)
        True
        >>> s = f.scale(u.double())
        >>> torch.allclose(f.linear(u.double(), s) + f.beta(4), f(u.double()))
        True
    """

    center: bool
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    def centre(self, v: torch.Tensor) -> torch.Tensor:
        """``C(v)``: ``v − mean(v)`` over the last dim for a LayerNorm, ``v`` for an RMSNorm."""
        return v - v.mean(-1, keepdim=True) if self.center else v

    def scale(self, u: torch.Tensor) -> torch.Tensor:
        """``s(u) = √(mean(C(u)²) + ε)``, shape ``[..., 1]``: the statistic frozen by :meth:`linear`."""
        c = self.centre(u)
        return torch.sqrt(c.pow(2).mean(-1, keepdim=True) + self.eps)

    def linear(self, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The norm's linear part at frozen scale ``s``: ``γ ⊙ C(v) / s`` (``s`` broadcast against ``v``)."""
        out = self.centre(v) / s
        return out * self.weight.to(out) if self.weight is not None else out

    def beta(self, d: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """``β`` as a ``[d]`` tensor (zeros when the norm has no bias)."""
        b = self.bias if self.bias is not None else torch.zeros(d, dtype=torch.float64)
        return b.to(like) if like is not None else b

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return self.linear(u, self.scale(u)) + self.beta(u.shape[-1], u)


def _param(mod: nn.Module, name: str) -> torch.Tensor | None:
    p = getattr(mod, name, None)
    if is_offloaded(p):  # accelerate keeps an offloaded module's values in its own hook (models.offload)
        p = offloaded_value(mod, "", name)
    return p.detach().double().cpu().flatten() if isinstance(p, torch.Tensor) else None


def norm_form(module: nn.Module, d: int | None = None) -> NormForm:
    """The :class:`NormForm` of a norm module, identified by what it computes.

    Candidates: centring on/off × weight as ``w`` or ``1 + w`` (Gemma) × the module's ``eps`` /
    ``variance_epsilon`` / ``epsilon``; the one that reproduces the module on a random ``[4, d]`` input to fp32
    rounding is returned.

    Raises:
        ValueError: no candidate reproduces the module (not a LayerNorm/RMSNorm-shaped norm).
    """
    w, b = _param(module, "weight"), _param(module, "bias")
    if d is None:
        shape = getattr(module, "normalized_shape", None)
        d = int(w.numel()) if w is not None else (int(shape[-1]) if shape else None)  # type: ignore[index]
    if d is None:
        raise ValueError(f"cannot tell the width of norm {type(module).__name__}: pass d=")
    eps = next((float(getattr(module, n)) for n in _EPS_NAMES if isinstance(getattr(module, n, None), float)), 1e-5)
    p = next(module.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    if is_offloaded(p):  # offloaded by accelerate: feed the probe input where the module's hook computes
        dev = execution_device(module, "", next(n for n, _ in module.named_parameters()))
    dt = p.dtype if p is not None and p.is_floating_point() else torch.float32
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, d, generator=g, dtype=torch.float64) * 2 + 0.5)
    with torch.no_grad():
        ref = module(x.to(device=dev, dtype=dt))
    ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).double().cpu()
    tol = 64 * torch.finfo(dt).eps * max(1.0, float(ref.abs().max()))
    weights = [None] if w is None else [w, w + 1.0]
    best = None
    for center in (True, False):
        for ww in weights:
            f = NormForm(center, ww, b, eps)
            err = float((f(x) - ref).abs().max())
            if err <= tol:
                return f
            best = err if best is None else min(best, err)
    raise ValueError(
        f"{type(module).__name__} is not a LayerNorm/RMSNorm of the form γ⊙C(u)/√(mean C(u)²+ε)+β "
        f"(closest candidate off by {best:.3g}); norm-based decompositions cannot linearise it"
    )


@dataclass(frozen=True)
class AttentionNorms:
    """The norms around one layer's attention (see the module docstring); each is a module or None."""

    pre: nn.Module | None
    post: nn.Module | None
    post_residual: nn.Module | None


_CACHE: weakref.WeakKeyDictionary[nn.Module, AttentionNorms] = weakref.WeakKeyDictionary()


def _first(t: Any) -> torch.Tensor | None:
    t = t[0] if isinstance(t, (tuple, list)) and t else t
    return t if isinstance(t, torch.Tensor) else None


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None or a.shape != b.shape:
        return False
    if a is b:
        return True
    scale = float(b.abs().max()) + 1e-6
    return bool((a.float() - b.float()).abs().max() <= 1e-4 * scale)


def attention_norms(adapter: ModelAdapter, layer: int) -> AttentionNorms:
    """Which norms sit before, after, and around the residual of ``layer``'s attention (probed once, cached).

    The probe records, on a one-token forward, the layer input, the attention input and output, the output
    projection's output and every norm module's input and output inside the layer; a norm is ``pre`` when its
    output is the attention input, ``post`` when its input is the attention output and ``post_residual`` when its
    input is ``resid_pre + attn.out`` and its output the attention module's output.

    Raises:
        ValueError: the layer has no discovered attention module.
    """
    s = adapter.structure
    attn = s.attn[layer]
    if attn is None:
        raise ValueError(f"layer {layer} has no discovered attention module; pass AdapterSpec(attn=...)")
    if attn in _CACHE:
        return _CACHE[attn]
    from tokensmith.models.hooks import _SUSPENDED

    todo = [i for i in range(s.num_layers) if s.attn[i] is not None and s.attn[i] not in _CACHE]
    recs: dict[int, dict[str, Any]] = {i: {"norms": []} for i in todo}
    handles: list[Any] = []

    def pre_hook(r: dict[str, Any], key: str):
        def fn(m: nn.Module, args: tuple, kw: dict) -> None:
            t = args[0] if args else kw.get("hidden_states")
            if isinstance(t, torch.Tensor) and key not in r:
                r[key] = t.detach()

        return fn

    def out_hook(r: dict[str, Any], key: str):
        def fn(m: nn.Module, args: tuple, out: Any) -> None:
            t = _first(out)
            if t is not None and key not in r:
                r[key] = t.detach()

        return fn

    try:
        for i in todo:
            r = recs[i]
            handles.append(s.layers[i].register_forward_pre_hook(pre_hook(r, "x"), with_kwargs=True))
            handles.append(s.attn[i].register_forward_pre_hook(pre_hook(r, "attn_in"), with_kwargs=True))
            handles.append(s.attn[i].register_forward_hook(out_hook(r, "attn_out")))
            if s.o_proj[i] is not None:
                handles.append(s.o_proj[i].register_forward_hook(out_hook(r, "p")))
            for m in s.layers[i].modules():
                if is_norm_module(m) and m is not s.layers[i]:
                    rec: dict[str, Any] = {"m": m}
                    r["norms"].append(rec)
                    handles.append(m.register_forward_pre_hook(pre_hook(rec, "in"), with_kwargs=True))
                    handles.append(m.register_forward_hook(out_hook(rec, "out")))
        ids = adapter._probe_ids(1).reshape(1, 1).to(adapter.device)
        kw: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "use_cache" in adapter._fwd_params:
            kw["use_cache"] = False
        was = adapter.model.training
        _SUSPENDED[0] += 1
        try:
            adapter.model.eval()
            with torch.no_grad():
                adapter.model(**kw)
        finally:
            _SUSPENDED[0] -= 1
            adapter.model.train(was)
    finally:
        for h in handles:
            h.remove()
    for i in todo:
        r = recs[i]
        x, a_in, a_out, p = r.get("x"), r.get("attn_in"), r.get("attn_out"), r.get("p")
        pre = post = post_res = None
        norms = [n for n in r["norms"] if "in" in n and "out" in n]
        # identity first (the norm's output object is the attention input), then equal values
        pre = next((n["m"] for n in norms if n["out"] is a_in), None)
        if pre is None:
            pre = next((n["m"] for n in norms if _same(n["in"], x) and _same(n["out"], a_in)), None)
        for n in norms:
            if n["m"] is pre:
                continue
            if post is None and a_out is not None and not _same(a_out, n["out"]) and (
                n["in"] is a_out or _same(n["in"], a_out)
            ):
                post = n["m"]
            elif (post_res is None and x is not None and p is not None and x.shape == p.shape
                  and _same(n["in"], x + p) and (n["out"] is a_out or _same(n["out"], a_out))):
                post_res = n["m"]
        _CACHE[s.attn[i]] = AttentionNorms(pre, post, post_res)  # type: ignore[index]
    return _CACHE[attn]
