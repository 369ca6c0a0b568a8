"""The logit lens: what the residual stream at every depth predicts, read through the model's own head.

**Logit lens** (nostalgebraist 2020, "interpreting GPT: the logit lens"; used per layer by LLM-Microscope,
Razzhigaev et al. 2025, and "The Remarkable Robustness of LLMs: Stages of Inference?", Lad et al. 2024):
decode the hidden state ``h_ℓ,t`` at depth ``ℓ`` and position ``t`` exactly as the model decodes its last
layer,

    z_ℓ,t = unembed(h_ℓ,t) = c · tanh(s · W_U · norm_f(h_ℓ,t) / c),        p_ℓ,t = softmax(z_ℓ,t)

(:meth:`ModelAdapter.unembed`: final norm, head chain, logit scale, soft-capping), and compare ``p_ℓ,t`` with
the model's own prediction ``p_L,t``:

- ``top_token`` / ``top_prob``: ``argmax_v p_ℓ,t(v)`` and its probability; ``top_k_tokens`` the ``k`` best;
- ``entropy`` ``H(p_ℓ,t) = −Σ_v p_ℓ,t(v) log p_ℓ,t(v)`` (nats);
- ``kl_to_final`` ``KL(p_L,t ‖ p_ℓ,t) = Σ_v p_L,t(v) (log p_L,t(v) − log p_ℓ,t(v))`` (nats; 0 at ``ℓ = L``);
- for a tracked token ``y``: ``token_prob`` ``p_ℓ,t(y)``, ``token_logprob`` and ``token_rank``
  ``#{v : z_ℓ,t(v) > z_ℓ,t(y)}`` (0 = top).

Depths follow :mod:`tokensmith.analysis.stream` (HF ``hidden_states`` convention: ``0`` = the embeddings,
``ℓ`` = output of block ``ℓ − 1``, ``L`` = the last block's output *before* the final norm, which
``unembed`` applies), so the lens at ``L`` *is* the model: its log-probs equal those of the forward.

:func:`logit_lens` gives the per-position picture of one text (one row per (layer, position));
:func:`logit_lens_stats` streams a corpus and averages, per layer, the next-token NLL, top-1 accuracy,
agreement with the final top-1, KL to the final distribution and entropy (the "stages of inference"
curves). ``tokensmith.attribution.logit_lens`` is the target-token view used by the attribution methods;
this module is the analysis picture with tidy frames and plots.

**Encoders.** A masked LM with its head (e.g. ``BertForMaskedLM``) is accepted by :func:`logit_lens`: its
head predicts the token *at* each position (the input itself where nothing is masked, the filler at a
``[MASK]``), so the ``next_token`` column and the default tracked token are the token at the same position
(``meta["objective"] == "masked"``). :func:`logit_lens_stats` needs next-token predictions and takes causal
LMs only. An encoder without an LM head and encoder-decoder models raise a ValueError.

Examples:
    >>> import tokensmith as ts
    >>> from tokensmith.analysis.lens import logit_lens
    >>> f = logit_lens(ts.tiny("llama"), "The capital of France is")
    >>> f.kind, sorted(set(f.layer)), int(f.position.max())
    ('logit_lens', [0, 1, 2], 4)
    >>> bool((f[f.layer == 2].kl_to_final.abs() < 1e-6).all())      # the last depth is the model itself
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from tokensmith.analysis.frames import AnalysisFrame, make_frame, register_plot, require_matplotlib
from tokensmith.analysis.stream import logit_chunks, require_lm_head, resolve_layers, stream_hidden

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["logit_lens", "logit_lens_stats", "plot_logit_lens", "plot_logit_lens_stats"]

STAT_COLUMNS = ("nll", "top1_accuracy", "top1_agreement", "kl_to_final", "entropy")


# ----------------------------------------------------------------------------------------------- helpers
def _check_lens_model(adapter: ModelAdapter, what: str, causal: bool) -> None:
    if adapter.structure.is_encoder_decoder:
        raise ValueError(
            f"{what} reads one layer stack through the LM head; {adapter.name!r} is an encoder-decoder model "
            "(its head reads the decoder, whose hidden states depend on the decoder input): use a decoder-only "
            "causal LM, or an encoder with its masked-LM head"
        )
    require_lm_head(adapter, what, causal=causal)


def _full_logits(adapter: ModelAdapter, h: torch.Tensor) -> torch.Tensor:
    """``unembed`` of a few rows (the caller chunks), float32 on CPU."""
    return torch.cat([z for _, z in logit_chunks(adapter, h, chunk=max(1, int(h.shape[0])))])


def _lens_chunks(
    adapter: ModelAdapter, hs: dict[int, torch.Tensor], L: int, chunk: int
) -> Iterator[tuple[int, int, dict[int, torch.Tensor]]]:
    """``(start, end, {depth: log p [end − start, V]})`` over chunks of positions, every depth of ``hs``
    (``[N, d]`` each, final depth ``L`` included) unembedded in ONE call of about ``chunk`` rows: a
    separate small matmul per depth re-reads ``W_U`` each time and is several times slower."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    need = sorted(hs)
    N = int(hs[L].shape[0])
    step = max(1, chunk // len(need))
    for s in range(0, N, step):
        e = min(N, s + step)
        z = _full_logits(adapter, torch.cat([hs[d][s:e] for d in need]))
        logp = torch.log_softmax(z, -1).view(len(need), e - s, -1)
        yield s, e, {d: logp[i] for i, d in enumerate(need)}


def _readout(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(max log p, argmax, entropy)`` of ``[N, V]`` log-probs (``0·log 0 = 0``)."""
    top_lp, top_id = logp.max(-1)
    p = logp.exp()
    ent = -torch.where(p > 0, p * logp, torch.zeros((), dtype=logp.dtype)).sum(-1)
    return top_lp, top_id, ent


def _kl(logp_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref ‖ p)`` per row (``0·log 0 = 0``; rows where ``p`` is 0 but ``p_ref`` is not give inf)."""
    p = logp_ref.exp()
    return torch.where(p > 0, p * (logp_ref - logp), torch.zeros((), dtype=logp.dtype)).sum(-1)


def _token_stats(logp: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(y), rank of y)`` per row (rank = number of tokens strictly more likely; 0 = top)."""
    lp = logp.gather(1, target[:, None].clamp_min(0)).squeeze(1)
    rank = (logp > lp[:, None]).sum(-1)
    return lp, rank


def _resolve_token(adapter: ModelAdapter, token: Any) -> int | None:
    if token is None:
        return None
    if isinstance(token, bool):
        raise TypeError("token must be a str (one token) or an int id, not a bool")
    if isinstance(token, int):
        return int(token)
    if isinstance(token, str):
        ids = adapter.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [adapter.tokenizer.decode([i]) for i in ids]
            hint = (f"track its first piece (token={pieces[0]!r}) or give a token id (token={ids[0]})" if ids
                    else "give a non-empty string or a token id")
            raise ValueError(f"token={token!r} encodes to {len(ids)} pieces {pieces} with this tokenizer; the lens "
                             f"tracks exactly one token: {hint}")
        return int(ids[0])
    raise TypeError(f"token must be None, a str (one token) or an int id, not {type(token).__name__}")


def _one_text(text: Any) -> list[Any]:
    if isinstance(text, str):
        return [text]
    if isinstance(text, torch.Tensor):
        if text.dim() == 2 and text.shape[0] == 1:
            return [text[0]]
        if text.dim() != 1:
            raise TypeError(f"logit_lens takes ONE text: a str or a 1-D tensor of ids, got shape {tuple(text.shape)}")
        return [text]
    if isinstance(text, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in text):
        return [list(text)]
    raise TypeError(
        f"logit_lens takes ONE text (a str or a list/1-D tensor of token ids), not {type(text).__name__}; "
        "for a corpus use logit_lens_stats"
    )


def _decode(adapter: ModelAdapter, ids: list[int]) -> list[str]:
    return [adapter.tokenizer.decode([int(i)]) for i in ids]


# ----------------------------------------------------------------------------------------------- logit lens
def logit_lens(
    adapter: ModelAdapter,
    text: Any,
    layers: Any = None,
    token: str | int | None = None,
    top_k: int = 3,
    chunk: int = 256,
) -> AnalysisFrame:
    """The logit lens (module docstring) of one text at every position and every requested depth.

    Args:
        adapter: a causal LM, or a masked LM with its head (module docstring, "Encoders").
        text: one text (str, encoded with ``adapter.encode``: the adapter's special tokens) or token ids.
        layers: hidden-state depths (:func:`~tokensmith.analysis.stream.resolve_layers`; default ``0..L``).
        token: the token to track: ``None`` = the actual next token at each position (none at the last
            one); a string that encodes to exactly one token (``" Paris"``) or an int id = that token at
            every position.
        top_k: how many top tokens to list in ``top_k_tokens``.
        chunk: rows (depth × position) unembedded per call (memory: a few ``chunk·V`` floats).

    Returns:
        ``AnalysisFrame(kind="logit_lens")``, one row per (layer, position): ``layer``, ``position``,
        ``input_id``, ``input_token``, ``next_token`` (the actual next token's string; None at the last
        position), ``top_id``, ``top_token``, ``top_prob``, ``top_k_tokens`` (list), ``entropy`` (nats),
        ``kl_to_final`` (``KL(p_L ‖ p_ℓ)``, nats), ``token_id``, ``token``, ``token_prob``,
        ``token_logprob``, ``token_rank`` (0 = top; ``<NA>`` where nothing is tracked). ``meta``: model,
        text, ids, layers, num_layers, objective (``"next_token"`` or ``"masked"``), tracked token.

    Raises:
        ValueError: an encoder without an LM head, an encoder-decoder model, a depth out of range, an empty
            text, a ``token`` string that is not exactly one token, a token id out of the vocabulary,
            ``top_k < 1``.
        TypeError: ``text`` is not one text (e.g. a list of strings), ``token`` of the wrong type.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.analysis.lens import logit_lens
        >>> ad = ts.tiny("llama")
        >>> f = logit_lens(ad, "The capital of France is", token=" Paris", layers=[0, -1])
        >>> sorted(set(f.layer)), set(f.token), len(f) == 2 * len(ad.encode("The capital of France is").input_ids)
        ([0, 2], {' Paris'}, True)
        >>> f.columns[:5].tolist()
        ['layer', 'position', 'input_id', 'input_token', 'next_token']
    """
    causal = bool(adapter.is_causal)
    _check_lens_model(adapter, "logit_lens", causal=False)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    items = _one_text(text)
    depths = resolve_layers(adapter, layers)
    tracked = _resolve_token(adapter, token)
    L = int(adapter.structure.num_layers)
    need = sorted(set(depths) | {L})
    hb = next(iter(stream_hidden(adapter, items, layers=need, batch_size=1, progress=False, desc="logit lens")))
    ids = hb.input_ids[0][hb.mask[0]].tolist()
    T = len(ids)
    hs = {d: hb.tokens(d) for d in need}  # [T, d] each
    if causal:
        default_target = ids[1:] + [-1]
    else:
        default_target = list(ids)
    target = torch.tensor([tracked] * T if tracked is not None else default_target, dtype=torch.long)
    has_target = target >= 0

    out: dict[int, dict[str, torch.Tensor]] = {d: {} for d in depths}
    V = None
    for s, e, lps in _lens_chunks(adapter, hs, L, chunk):
        lpL = lps[L]
        if V is None:
            V = int(lpL.shape[-1])
            if tracked is not None and not 0 <= tracked < V:
                raise ValueError(f"token id {tracked} is out of the vocabulary [0, {V}) of {adapter.name!r}")
            if top_k > V:
                raise ValueError(f"top_k={top_k} exceeds the vocabulary size {V}")
        tgt = target[s:e]
        for d in depths:
            logp = lps[d]
            top_lp, top_id, ent = _readout(logp)
            tok_lp, rank = _token_stats(logp, tgt)
            parts = {
                "top_prob": top_lp.exp(),
                "top_id": top_id,
                "top_k": logp.topk(top_k, -1).indices,
                "entropy": ent,
                "kl": torch.zeros_like(ent) if d == L else _kl(lpL, logp),
                "tok_lp": tok_lp,
                "rank": rank,
            }
            for k, v in parts.items():
                out[d][k] = torch.cat([out[d][k], v]) if k in out[d] else v

    input_tokens = _decode(adapter, ids)
    next_tokens: list[str | None] = input_tokens[1:] + [None] if causal else list(input_tokens)
    token_strs = [adapter.tokenizer.decode([int(t)]) if t >= 0 else None for t in target.tolist()]
    cache: dict[int, str] = {}

    def dec(i: int) -> str:
        if i not in cache:
            cache[i] = adapter.tokenizer.decode([i])
        return cache[i]

    rows = []
    for d in depths:
        o = out[d]
        top_id, topk = o["top_id"].tolist(), o["top_k"].tolist()
        top_prob, ent, kl = o["top_prob"].tolist(), o["entropy"].tolist(), o["kl"].tolist()
        tok_lp, rank = o["tok_lp"].tolist(), o["rank"].tolist()
        for t in range(T):
            ok = bool(has_target[t])
            rows.append({
                "layer": d,
                "position": t,
                "input_id": ids[t],
                "input_token": input_tokens[t],
                "next_token": next_tokens[t],
                "top_id": top_id[t],
                "top_token": dec(top_id[t]),
                "top_prob": top_prob[t],
                "top_k_tokens": [dec(i) for i in topk[t]],
                "entropy": ent[t],
                "kl_to_final": kl[t],
                "token_id": int(target[t]) if ok else None,
                "token": token_strs[t],
                "token_prob": math.exp(tok_lp[t]) if ok else math.nan,
                "token_logprob": tok_lp[t] if ok else math.nan,
                "token_rank": rank[t] if ok else None,
            })
    f = make_frame(
        rows, kind="logit_lens", model=adapter.name, text=items[0] if isinstance(items[0], str) else None,
        ids=ids, layers=depths, num_layers=L, objective="next_token" if causal else "masked",
        token=tracked, top_k=top_k,
    )
    f["token_id"] = f["token_id"].astype("Int64")
    f["token_rank"] = f["token_rank"].astype("Int64")
    return f


# ----------------------------------------------------------------------------------------------- corpus stats
def logit_lens_stats(
    adapter: ModelAdapter,
    texts: Any,
    layers: Any = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    column: str = "text",
    chunk: int = 256,
) -> AnalysisFrame:
    """Per-layer logit-lens statistics over a corpus, streamed (:func:`~tokensmith.analysis.stream.stream_hidden`).

    Over every position ``t`` that predicts a real next token ``y_t`` (each text's last token predicts
    nothing), per depth ``ℓ``:

    - ``nll`` = mean ``−log p_ℓ,t(y_t)``; ``top1_accuracy`` = mean ``[argmax p_ℓ,t = y_t]``;
    - ``top1_agreement`` = mean ``[argmax p_ℓ,t = argmax p_L,t]``;
    - ``kl_to_final`` = mean ``KL(p_L,t ‖ p_ℓ,t)``; ``entropy`` = mean ``H(p_ℓ,t)`` (nats);
    - ``n_tokens`` = the number of predicting positions.

    The sums are float64 and order-free, so the result equals the all-at-once computation for any
    ``batch_size`` (left padding is exact; up to fp32 rounding of the forward).

    Args:
        adapter: a causal LM with its head.
        texts: a str, a list of str or token ids, a ``[N, T]`` id tensor, or a ``datasets.Dataset`` (``column``).
        layers: depths (default ``0..L``); the final depth is always computed (for KL and agreement).
        batch_size: texts per forward pass (left-padded batches).
        max_length: truncate each text to this many tokens.
        progress: a tqdm bar over the texts.
        column: the text column of a Dataset.
        chunk: rows (depth × position) unembedded per call.

    Returns:
        ``AnalysisFrame(kind="logit_lens_stats")``: one row per layer with ``layer``, ``nll``,
        ``top1_accuracy``, ``top1_agreement``, ``kl_to_final``, ``entropy``, ``n_tokens``.

    Raises:
        ValueError: not a causal LM with a head, a depth out of range, an empty corpus or text, no text with
            at least two tokens (nothing to predict), bad ``batch_size``/``max_length``.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.analysis.lens import logit_lens_stats
        >>> s = logit_lens_stats(ts.tiny("llama"), ["Hello world, how are you?", "A second text."], progress=False)
        >>> s.layer.tolist(), float(s.kl_to_final.iloc[-1]), float(s.top1_agreement.iloc[-1])
        ([0, 1, 2], 0.0, 1.0)
    """
    _check_lens_model(adapter, "logit_lens_stats", causal=True)
    depths = resolve_layers(adapter, layers)
    L = int(adapter.structure.num_layers)
    need = sorted(set(depths) | {L})
    sums = {d: torch.zeros(len(STAT_COLUMNS), dtype=torch.float64) for d in depths}
    n = 0
    for hb in stream_hidden(adapter, texts, need, batch_size, max_length, column, progress, desc="logit lens"):
        m = hb.label_mask
        y = hb.labels[m]
        if y.numel() == 0:
            continue
        hs = {d: hb.tokens(d, m) for d in need}
        n += int(y.numel())
        for s, e, lps in _lens_chunks(adapter, hs, L, chunk):
            yc = y[s:e]
            lpL = lps[L]
            topL = lpL.argmax(-1)
            for d in depths:
                logp = lps[d]
                _, top_id, ent = _readout(logp)
                lp = logp.gather(1, yc[:, None]).squeeze(1)
                kl = torch.zeros_like(ent) if d == L else _kl(lpL, logp)
                vals = torch.stack([-lp.double(), (top_id == yc).double(), (top_id == topL).double(),
                                    kl.double(), ent.double()])
                sums[d] += vals.sum(-1)
    if n == 0:
        raise ValueError("no position predicts a next token: every text has a single token; give texts of at "
                         "least two tokens (or a larger max_length)")
    rows = [{"layer": d, **{c: float(sums[d][i] / n) for i, c in enumerate(STAT_COLUMNS)}, "n_tokens": n}
            for d in depths]
    return make_frame(rows, kind="logit_lens_stats", model=adapter.name, n_tokens=n, layers=depths, num_layers=L,
                      batch_size=batch_size, max_length=max_length)


# ----------------------------------------------------------------------------------------------- plots
def _subsample(values: list[int], max_rows: int | None) -> list[int]:
    """At most ``max_rows`` evenly spaced values, always the first and the last."""
    if max_rows is None or len(values) <= max_rows:
        return list(values)
    if max_rows < 2:
        return [values[-1]]
    idx = sorted({round(i * (len(values) - 1) / (max_rows - 1)) for i in range(max_rows)})
    return [values[i] for i in idx]


def _short(s: Any, n: int) -> str:
    s = "" if s is None else str(s)
    s = s.replace("\n", "\\n").replace("\t", "\\t")
    return s if len(s) <= n else s[: max(1, n - 1)] + "…"


@register_plot("logit_lens")
def plot_logit_lens(
    frame: AnalysisFrame,
    ax: Any = None,
    value: str = "top_prob",
    max_rows: int | None = 16,
    annotate: bool = True,
    max_chars: int = 6,
    cmap: str = "viridis",
    **kw: Any,
) -> Any:
    """The classic logit-lens picture: y = layer (deepest at the top), x = position (tick labels = input
    tokens), colour = ``value`` (any numeric column: ``top_prob``, ``kl_to_final``, ``token_prob``,
    ``entropy``, ...), each cell annotated with its top token (truncated to ``max_chars``). On deep models the
    layers are subsampled to at most ``max_rows`` evenly spaced rows (first and last kept; ``None`` = all).

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.analysis.lens import logit_lens
        >>> f = logit_lens(ts.tiny("llama"), "Hello world")
        >>> ax = f.plot(value="kl_to_final")            # one image row per layer, one column per position
        >>> ax.images[0].get_array().shape
        (3, 2)
        >>> import matplotlib.pyplot as plt; plt.close("all")

    Raises:
        ValueError: ``value`` is not a numeric column of the frame.
    """
    plt = require_matplotlib()
    if value not in frame.columns:
        raise ValueError(f"value={value!r} is not a column; numeric columns: {_numeric_columns(frame)}")
    vals = frame[value]
    if not (vals.dtype.kind in "fiub" or str(vals.dtype) in ("Int64", "Float64")):
        raise ValueError(f"value={value!r} is not numeric; numeric columns: {_numeric_columns(frame)}")
    layers = _subsample(sorted(set(frame["layer"].tolist())), max_rows)
    sub = frame[frame["layer"].isin(layers)]
    grid = sub.pivot(index="layer", columns="position", values=value).astype(float).loc[layers]
    tops = sub.pivot(index="layer", columns="position", values="top_token").loc[layers]
    positions = list(grid.columns)
    tokens = frame[frame["layer"] == layers[0]].set_index("position")["input_token"].reindex(positions).tolist()
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(positions) + 1.5), max(2.5, 0.35 * len(layers) + 1.2)))
    im = ax.imshow(grid.to_numpy(), aspect="auto", origin="lower", cmap=cmap, **kw)
    ax.figure.colorbar(im, ax=ax, label=value)
    ax.set_xticks(range(len(positions)))
    ax.set_xticklabels([_short(t, 10) for t in tokens], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(x) for x in layers], fontsize=8)
    ax.set_xlabel("input token (position)")
    ax.set_ylabel("layer (depth)")
    ax.set_title(f"logit lens: {value}")
    if annotate:
        arr = grid.to_numpy()
        lo, hi = im.get_clim()
        for i in range(len(layers)):
            for j in range(len(positions)):
                v = arr[i, j]
                dark = v == v and hi > lo and (v - lo) / (hi - lo) < 0.5
                ax.text(j, i, _short(tops.iat[i, j], max_chars), ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
    return ax


def _numeric_columns(frame: AnalysisFrame) -> list[str]:
    return [c for c in frame.columns if frame[c].dtype.kind in "fiub" or str(frame[c].dtype) in ("Int64", "Float64")]


@register_plot("logit_lens_stats")
def plot_logit_lens_stats(frame: AnalysisFrame, ax: Any = None, columns: Any = None, **kw: Any) -> Any:
    """Lines vs layer: the nats columns (``nll``, ``kl_to_final``, ``entropy``) on the left axis, the
    fractions (``top1_accuracy``, ``top1_agreement``) on a right twin axis. ``columns`` picks a subset.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.analysis.lens import logit_lens_stats
        >>> ax = logit_lens_stats(ts.tiny("llama"), ["Hello world", "Another text"], progress=False).plot()
        >>> sum(len(a.get_lines()) for a in ax.figure.axes)
        5
        >>> import matplotlib.pyplot as plt; plt.close("all")

    Raises:
        ValueError: a requested column is not one of the statistics.
    """
    plt = require_matplotlib()
    cols = list(STAT_COLUMNS if columns is None else ([columns] if isinstance(columns, str) else columns))
    bad = [c for c in cols if c not in STAT_COLUMNS or c not in frame.columns]
    if bad:
        raise ValueError(f"columns {bad} are not logit-lens statistics; choose from {list(STAT_COLUMNS)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    nats = [c for c in cols if c in ("nll", "kl_to_final", "entropy")]
    frac = [c for c in cols if c in ("top1_accuracy", "top1_agreement")]
    for c in nats:
        ax.plot(frame["layer"], frame[c], marker="o", label=c, **kw)
    ax.set_xlabel("layer (depth)")
    ax.set_ylabel("nats")
    handles, labels = ax.get_legend_handles_labels()
    if frac:
        ax2 = ax.twinx() if nats else ax
        for k, c in enumerate(frac):
            ax2.plot(frame["layer"], frame[c], marker="s", linestyle="--", color=f"C{len(nats) + k}", label=c, **kw)
        ax2.set_ylabel("fraction")
        ax2.set_ylim(-0.02, 1.02)
        if ax2 is not ax:
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        else:
            handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, fontsize=8)
    ax.set_title("logit lens by layer")
    return ax
