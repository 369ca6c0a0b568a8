"""Per-token next-token features of a causal LM (METHODS ANA-1): the inputs of PAWN-style detectors.

For every position ``t`` of a text that predicts a real next token ``x_{t+1}``, with
``p_t = softmax(unembed(h_L,t))`` the model's own next-token distribution (the last layer read through
its final norm and head, :meth:`ModelAdapter.unembed`):

- ``logprob`` = ``log p_t(x_{t+1})`` (the per-token log-likelihood; ``−Σ_t logprob`` over a text is its
  total cross-entropy, i.e. HF's mean ``loss`` with ``labels=input_ids`` times the number of predicted tokens);
- ``entropy`` = ``−Σ_v p_t(v) log p_t(v)`` (nats);
- ``rank`` = ``#{v : p_t(v) > p_t(x_{t+1})}`` (0 = the model's top-1);
- ``max_prob`` = ``max_v p_t(v)``;
- with ``hidden=True`` also ``h̃_t = norm_f(h_L,t)``, the last layer's state *after* the final norm (what
  the head reads; HF's ``hidden_states[-1]`` for models that final-norm it, e.g. Llama, GPT-2).

These are the token features of PAWN (Miralles-González et al. 2025, "Pay Attention to What Matters: a
detector of machine-generated text": log-prob, entropy, rank and max-prob per token, with the frozen
backbone's hidden states, aggregated by a learned attention over tokens). They are computed
batch by batch (:func:`~tokensmith.analysis.stream.stream_hidden`, left padding exact) and the head runs
``chunk`` positions at a time (:func:`~tokensmith.analysis.stream.logit_chunks`): never ``[B, T, V]``.

Examples:
    >>> import tokensmith as ts
    >>> from tokensmith.analysis.features import next_token_features
    >>> ds = next_token_features(ts.tiny("llama"), ["Hello world", "A second text"], progress=False)
    >>> ds.num_rows, len(ds[0]["logprob"]) == len(ds[0]["input_ids"]) - 1
    (2, True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tokensmith.analysis.lens import _full_logits, _readout, _token_stats
from tokensmith.analysis.stream import as_texts, require_lm_head, stream_hidden

if TYPE_CHECKING:  # pragma: no cover
    import datasets

    from tokensmith.models.adapter import ModelAdapter

__all__ = ["next_token_features", "FEATURE_COLUMNS"]

FEATURE_COLUMNS = ("logprob", "entropy", "rank", "max_prob")


def next_token_features(
    adapter: ModelAdapter,
    texts: Any,
    batch_size: int = 8,
    max_length: int | None = None,
    per: str = "text",
    column: str = "text",
    hidden: bool = False,
    progress: bool = True,
    chunk: int = 256,
) -> datasets.Dataset:
    """Per-token features (module docstring) of every text, as a ``datasets.Dataset``.

    Args:
        adapter: a causal LM with its head.
        texts: a str, a list of str or token ids, a ``[N, T]`` id tensor, or a ``datasets.Dataset`` whose
            ``column`` holds the texts (its other columns, e.g. ``label``, are carried over).
        batch_size: texts per forward pass (left-padded batches, exact).
        max_length: truncate each text to this many tokens.
        per: ``"text"``: one row per text, list columns; ``"token"``: one row per predicted token.
        column: the text column of a Dataset.
        hidden: also return the final-normed last-layer state at each predicting position (``d`` floats).
        progress: a tqdm bar over the texts.
        chunk: positions unembedded at a time.

    Returns:
        ``per="text"``: the input Dataset's columns (when ``texts`` is one), then ``text_index``,
        ``input_ids`` (all ``n`` tokens), ``logprob``, ``entropy``, ``rank``, ``max_prob`` (``n − 1`` values
        each: entry ``i`` is the prediction of ``input_ids[i + 1]`` from position ``i``), ``n_predicted``
        and, with ``hidden``, ``hidden`` (``n − 1`` vectors). A one-token text has empty lists.
        ``per="token"``: the input Dataset's columns except the text column, then ``text_index``,
        ``position`` (index of the predicted token in the text, ``≥ 1``), ``token_id`` (the predicted token),
        the four features and, with ``hidden``, ``hidden`` (the state at ``position − 1``).

    Raises:
        ValueError: not a causal LM with a head, ``per`` not ``"text"``/``"token"``, an empty corpus or
            text, a Dataset without ``column``, bad ``batch_size``/``max_length``.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.analysis.features import next_token_features
        >>> ad = ts.tiny("llama")
        >>> tok = next_token_features(ad, ["Hello world", "A second text"], per="token", progress=False)
        >>> tok.column_names
        ['text_index', 'position', 'token_id', 'logprob', 'entropy', 'rank', 'max_prob']
        >>> min(tok["position"]), all(r >= 0 for r in tok["rank"])
        (1, True)
    """
    import datasets

    if per not in ("text", "token"):
        raise ValueError(f"per must be 'text' (one row per text) or 'token' (one row per predicted token), "
                         f"got {per!r}")
    require_lm_head(adapter, "next_token_features", causal=True)
    items = as_texts(texts, column)
    is_ds = hasattr(texts, "column_names") and not isinstance(texts, (str, list, tuple, torch.Tensor))
    L = int(adapter.structure.num_layers)
    norm = adapter.structure.final_norm

    per_text: list[dict[str, Any]] = []
    for hb in stream_hidden(adapter, items, [L], batch_size, max_length, "text", progress, desc="token features"):
        m = hb.label_mask
        y = hb.labels[m]
        h = hb.tokens(L, m)
        feats = {c: [] for c in FEATURE_COLUMNS}
        hid = []
        for s in range(0, int(y.numel()), chunk):
            hc = h[s : s + chunk]
            logp = torch.log_softmax(_full_logits(adapter, hc), -1)
            top_lp, _, ent = _readout(logp)
            lp, rank = _token_stats(logp, y[s : s + chunk])
            feats["logprob"].append(lp)
            feats["entropy"].append(ent)
            feats["rank"].append(rank)
            feats["max_prob"].append(top_lp.exp())
            if hidden:
                with torch.no_grad():
                    x = hc.to(device=adapter.device, dtype=adapter.dtype)
                    hid.append((norm(x) if norm is not None else x).float().cpu())
        counts = m.sum(1).tolist()
        cat = {c: (torch.cat(v) if v else torch.empty(0)) for c, v in feats.items()}
        split = {c: torch.split(v, counts) for c, v in cat.items()}
        hsplit = torch.split(torch.cat(hid), counts) if hidden and hid else None
        for b, idx in enumerate(hb.index):
            row = {
                "text_index": idx,
                "input_ids": hb.input_ids[b][hb.mask[b]].tolist(),
                **{c: split[c][b].tolist() for c in FEATURE_COLUMNS},
            }
            row["rank"] = [int(r) for r in row["rank"]]
            row["n_predicted"] = int(counts[b])
            if hidden:
                row["hidden"] = hsplit[b].tolist() if hsplit is not None else []
            per_text.append(row)

    extra: dict[str, list[Any]] = {}
    if is_ds:
        keep = [c for c in texts.column_names if per == "text" or c != column]
        extra = {c: list(texts[c]) for c in keep}
    if per == "text":
        cols = ["text_index", "input_ids", *FEATURE_COLUMNS, "n_predicted"] + (["hidden"] if hidden else [])
        data = {**{c: v for c, v in extra.items() if c not in cols}, **{c: [r[c] for r in per_text] for c in cols}}
        return datasets.Dataset.from_dict(data)
    out: dict[str, list[Any]] = {c: [] for c in extra if c not in ("text_index", "position", "token_id")}
    base = ["text_index", "position", "token_id", *FEATURE_COLUMNS] + (["hidden"] if hidden else [])
    for c in base:
        out[c] = []
    for r in per_text:
        k = r["n_predicted"]
        i = r["text_index"]
        for c in list(out):
            if c in extra:
                out[c].extend([extra[c][i]] * k)
        out["text_index"].extend([i] * k)
        out["position"].extend(range(1, k + 1))
        out["token_id"].extend(r["input_ids"][1 : k + 1])
        for c in FEATURE_COLUMNS:
            out[c].extend(r[c])
        if hidden:
            out["hidden"].extend(r["hidden"])
    return datasets.Dataset.from_dict(out)
