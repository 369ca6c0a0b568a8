"""Logit lens and direct logit attribution: reading the residual stream through the unembedding.

**Logit lens** (nostalgebraist, 2020): decode the residual stream after every layer with the model's own
final norm and head, ``p_ℓ = softmax(unembed(h_ℓ))`` (:meth:`ModelAdapter.unembed`), at the position that
predicts each target token, and report ``log p_ℓ(y_t)``, the rank of ``y_t`` and ``KL(p_L ‖ p_ℓ)`` against the
model's own prediction. ``h_ℓ`` is the input of layer 0 (``"embed"``: token plus position embeddings) and the
output of every layer; the last layer reproduces the model's log-probs.

**Direct logit attribution** (DLA; Elhage et al., 2021 "A Mathematical Framework for Transformer Circuits"):
the final residual at the predicting position ``q`` is a sum of components,
``h_q = e_q + Σ_ℓ (attn_ℓ,q + mlp_ℓ,q)``, and each attention update splits over sources
(:mod:`tokensmith.attribution.decomposition`): ``attn_ℓ,q = Σ_j Σ_h α^{ℓ,h}_{qj} f^{ℓ,h}(x_j) + b_ℓ``. The logit
of the target ``t`` is linear in ``h_q`` once the final norm's scale is frozen at ``h_q`` itself (standard DLA
practice):

    logit_t = w_t · N_f(h_q) + c_t = Σ_components w_t · (γ ⊙ C(component) / s(h_q)) + (w_t · β + c_t)

with ``w_t`` the head's direction for ``t`` (read by autograd from the head — it must be affine — times the
logit scale), ``c_t`` the head bias and ``β`` the final norm's bias. So

    score[t, j] = Σ_ℓ Σ_h α^{ℓ,h}_{qj} f^{ℓ,h}(x_j) · u_t,     u_t = w_t through the frozen final norm,

and ``Σ_j score[t, j] + Σ_ℓ attn_bias_ℓ + Σ_ℓ mlp_ℓ + embed = linear_logit = logit_t − norm_bias`` exactly.
``extra`` holds every term per row (``per_layer`` ``attn`` / ``mlp`` / ``attn_bias`` per layer, ``embed``,
``linear_logit``, ``norm_bias``, ``logit``) and ``excluded`` (the score mass on sources left out, e.g. template
tokens). For a Gemma-style final soft-capping the attributed logit is the one before the cap. Attention updates
through a post-attention norm (Gemma 2/3) are linearised at that norm's input; a post-LN block (BERT) has no
additive residual stream and is refused. MLP components are not split over sources (they are position-wise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.attribution.base import AttributionMethod, MethodOutput, register_method
from tokensmith.attribution.decomposition import _check_decomposable, capture_layers, decompose_layer
from tokensmith.attribution.targets import AttributionProblem, prepare
from tokensmith.models.norms import NormForm, norm_form

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["LogitLensResult", "logit_lens", "DirectLogitAttribution", "unembedding_directions"]


def _require_lm(adapter: ModelAdapter, what: str) -> None:
    s = adapter.structure
    if s.lm_head is None:
        raise ValueError(f"{what} reads hidden states through the LM head, and {adapter.name!r} has none: load the "
                         "model with its language-modelling head (e.g. AutoModelForCausalLM, ts.load('<causal LM>'))")
    if not adapter.is_causal:
        raise ValueError(f"{what} decodes next-token predictions of a causal LM; {adapter.name!r} is an encoder "
                         "(its head predicts masked tokens, not the next one): use a causal LM")


@dataclass
class LogitLensResult:
    """Per-layer logit-lens readings at each target row's predicting position.

    Attributes:
        layers: ``K`` labels: ``"embed"`` (input of layer 0) and ``"layers.{i}.resid_post"``.
        logprobs: ``[R, K]`` ``log p_ℓ(y_t)``.
        ranks: ``[R, K]`` rank of ``y_t`` under ``p_ℓ`` (0 = top token).
        kl: ``[R, K]`` ``KL(p_final ‖ p_ℓ)`` in nats (0 at the last layer).
        target_ids, target_tokens, target_positions: the rows.
        top_tokens: ``[R][K]`` the top token of each reading.
    """

    layers: list[str]
    logprobs: torch.Tensor
    ranks: torch.Tensor
    kl: torch.Tensor
    target_ids: torch.Tensor
    target_tokens: list[str]
    target_positions: torch.Tensor
    top_tokens: list[list[str]] = field(default_factory=list)

    def to_pandas(self) -> Any:
        """A tidy DataFrame: one row per (target row, layer)."""
        import pandas as pd

        rows = []
        for t in range(self.logprobs.shape[0]):
            for k, name in enumerate(self.layers):
                rows.append({
                    "row": t, "target": self.target_tokens[t], "target_position": int(self.target_positions[t]),
                    "layer": name, "depth": k, "logprob": float(self.logprobs[t, k]), "rank": int(self.ranks[t, k]),
                    "kl_to_final": float(self.kl[t, k]), "top_token": self.top_tokens[t][k] if self.top_tokens else None,
                })
        return pd.DataFrame(rows)


def _lens_layers(adapter: ModelAdapter, layers: Any) -> list[str]:
    n = adapter.structure.num_layers
    if layers is None:
        return ["embed"] + [f"layers.{i}.resid_post" for i in range(n)]
    if isinstance(layers, (int, str)):
        layers = [layers]
    out = []
    for x in layers:
        if x == "embed":
            out.append("embed")
        elif isinstance(x, int) and not isinstance(x, bool) and -n <= x < n:
            out.append(f"layers.{x % n}.resid_post")
        else:
            raise ValueError(f"layers holds layer indices in [-{n}, {n}) or 'embed', got {x!r}")
    return out


def logit_lens(adapter: ModelAdapter, inputs: Any, target: Any = None, layers: Any = None,
               **prepare_kwargs: Any) -> LogitLensResult:
    """The logit lens (module docstring) for each target token of ``target`` given ``inputs``.

    ``inputs``/``target``/``prepare_kwargs`` are those of :func:`tokensmith.attribution.attribute` (a forced
    continuation, ``"generate"``, token ids, or an ``Encoded`` with a target; ``chat=True`` for a chat).
    ``layers``: layer indices and/or ``"embed"`` (default: ``"embed"`` and every layer).

    Examples:
        >>> import tokensmith as ts
        >>> lens = logit_lens(ts.tiny("llama"), "The capital of France is", target=" Paris")
        >>> lens.logprobs.shape[1] == 1 + 2   # embed + two layers
        True

    Raises:
        ValueError: a model without an LM head or an encoder; a Contrast or callable target.
    """
    _require_lm(adapter, "the logit lens")
    problem = prepare(adapter, inputs, target, **prepare_kwargs)
    if problem.kind != "tokens":
        raise ValueError("the logit lens reads target tokens: give a continuation, 'generate' or token ids, not a "
                         f"{problem.kind} target")
    names = _lens_layers(adapter, layers)
    hooks = ["layers.0.resid_pre" if n == "embed" else n for n in names]
    last = f"layers.{adapter.structure.num_layers - 1}.resid_post"
    pos = problem.target_positions
    q = pos - 1
    tgt = problem.ids[pos]
    with torch.no_grad(), adapter.hooks(cache=sorted(set(hooks + [last]))) as h:
        adapter.forward(problem.ids[None])

        def read(name: str) -> torch.Tensor:  # logits of the residual ``name`` at the predicting positions
            t = h.cache[name][0]
            return adapter.unembed(t[q.to(t.device)].to(adapter.device)).float().cpu()

        final = torch.log_softmax(read(last), -1)
        lps, ranks, kls, tops = [], [], [], []
        for name in hooks:
            z = read(name)
            lp = torch.log_softmax(z, -1)
            zt = z.gather(1, tgt[:, None])
            lps.append(lp.gather(1, tgt[:, None])[:, 0])
            ranks.append((z > zt).sum(-1))
            kls.append((final.exp() * (final - lp)).sum(-1).clamp_min(0))
            tops.append(z.argmax(-1))
    tok = adapter.tokenizer
    top_ids = torch.stack(tops, 1)
    return LogitLensResult(
        layers=names,
        logprobs=torch.stack(lps, 1),
        ranks=torch.stack(ranks, 1),
        kl=torch.stack(kls, 1),
        target_ids=tgt,
        target_tokens=list(problem.target_labels),
        target_positions=pos,
        top_tokens=[tok.convert_ids_to_tokens(r.tolist()) for r in top_ids],
    )


def unembedding_directions(adapter: ModelAdapter, normed: torch.Tensor, tokens: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head as an affine map per row: ``logit_{t_r}(n) = w_r · n + c_r`` (before any soft-capping).

    ``normed``: ``[R, d]`` final-norm outputs; ``tokens``: ``[R]``. Returns ``(w [R, d], c [R], logit [R])`` in
    float64 (``logit`` at ``normed``). ``w`` is read by autograd from :meth:`ModelAdapter.unembed` with
    ``final_norm=False`` (head chain and logit scale), the soft cap ``c·tanh(z/c)`` undone with ``c·atanh``.

    Raises:
        ValueError: the head is not affine (a masked LM's transform head).
    """
    s = adapter.structure
    cap = s.logit_softcap
    p = next(adapter.model.parameters())
    idx = torch.arange(tokens.numel())

    def g(n: torch.Tensor) -> torch.Tensor:
        z = adapter.unembed(n, final_norm=False)[idx, tokens.to(n.device)]
        return cap * torch.atanh(z / cap) if cap else z

    n = normed.detach().to(device=p.device, dtype=p.dtype).requires_grad_(True)
    with torch.enable_grad():
        val = g(n)
        (w,) = torch.autograd.grad(val.sum(), n)
    with torch.no_grad():
        c = g(torch.zeros_like(n)).double().cpu()
    w64, val64 = w.double().cpu(), val.detach().double().cpu()
    lin = (w64 * normed.double().cpu()).sum(-1) + c
    tol = 1e3 * torch.finfo(p.dtype).eps * (val64.abs() + (w64.abs() * normed.double().cpu().abs()).sum(-1) + 1)
    if bool(((lin - val64).abs() > tol).any()):
        raise ValueError("direct logit attribution needs an affine LM head (logits = W·norm_f(h) + b); this model's "
                         "head is not (e.g. a masked LM's transform head)")
    return w64, c, val64


@register_method("direct_logit", "dla")
@dataclass
class DirectLogitAttribution(AttributionMethod):
    """Direct logit attribution over source tokens (module docstring): ``s_tj = Σ_ℓ Σ_h α f(x_j) · u_t``.

    The per-layer attention and MLP contributions to each row's (linearised) logit are in
    ``extra["per_layer"]`` (``mlp``: the rest of each layer's update — its MLP, or the whole layer for a layer
    without attention). Takes token targets of a causal LM.
    """

    requires = ("attention_probe",)
    targets = ("tokens",)

    def attribute_batch(self, problem: AttributionProblem) -> MethodOutput:
        ad = problem.adapter
        _require_lm(ad, "direct logit attribution")
        s = ad.structure
        n = s.num_layers
        att_layers = list(ad.capabilities()["attention_layers"])
        _check_decomposable(ad, att_layers, "direct logit attribution")
        extra_names = [f"layers.{i}.{p}" for i in range(n) for p in ("resid_pre", "resid_post")]
        recs, cache = capture_layers(ad, problem.ids, att_layers, extra=extra_names)
        pos = problem.target_positions
        q = pos - 1
        tgt = problem.ids[pos]
        R, L = q.numel(), len(problem.encoded)
        h_q = cache[f"layers.{n - 1}.resid_post"][q]  # [R, d] the final norm's input
        nf: NormForm | None = norm_form(s.final_norm, h_q.shape[-1]) if s.final_norm is not None else None
        p = next(ad.model.parameters())
        with torch.no_grad():
            normed = s.final_norm(h_q.to(device=p.device, dtype=p.dtype)) if s.final_norm is not None else h_q
        w, c, logit = unembedding_directions(ad, normed.double().cpu() if s.final_norm is not None else h_q, tgt)
        scale = nf.scale(h_q) if nf is not None else None

        def logit_of(v: torch.Tensor) -> torch.Tensor:  # v [R, ..., d] -> w_r · N_lin(v)
            if nf is not None:
                sh = scale.view(R, *([1] * (v.dim() - 1)))  # type: ignore[union-attr]
                v = nf.linear(v, sh)
            return (v * w.view(R, *([1] * (v.dim() - 2)), -1)).sum(-1)

        scores = torch.zeros(R, L, dtype=torch.float64)
        attn = torch.zeros(R, n, dtype=torch.float64)
        attn_bias = torch.zeros(R, n, dtype=torch.float64)
        mlp = torch.zeros(R, n, dtype=torch.float64)
        for i in range(n):
            update = torch.zeros_like(h_q)
            if i in recs:
                try:
                    dec = decompose_layer(ad, recs[i], q, residual=False)
                except ValueError as err:
                    raise ValueError(f"direct logit attribution needs an additive residual stream: {err}") from err
                per = logit_of(dec.vectors)  # [R, L]
                scores += per
                attn_bias[:, i] = logit_of(dec.bias)
                attn[:, i] = per.sum(-1) + attn_bias[:, i]
                update = dec.output
            mlp[:, i] = logit_of(cache[f"layers.{i}.resid_post"][q] - cache[f"layers.{i}.resid_pre"][q] - update)
        embed = logit_of(cache["layers.0.resid_pre"][q])
        linear = logit_of(h_q)
        norm_bias = (w * nf.beta(w.shape[-1])).sum(-1) + c if nf is not None else c
        valid = problem.valid()
        excluded = torch.where(valid, torch.zeros_like(scores), scores).sum(-1)
        return MethodOutput(scores.float(), extra={
            "per_layer": {"attn": attn.tolist(), "mlp": mlp.tolist(), "attn_bias": attn_bias.tolist()},
            "embed": embed.tolist(), "linear_logit": linear.tolist(), "norm_bias": norm_bias.tolist(),
            "logit": logit.tolist(), "excluded": excluded.tolist(), "query_positions": q.tolist(),
        })
