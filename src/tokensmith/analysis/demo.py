"""The ``analysis`` section of the ``tokensmith demo`` report (registered on import): the logit lens of one
short factual prompt, "The Eiffel Tower is in the city of", as a layer × position heatmap of the top token,
and the rank of the answer token " Paris" at the last position, layer by layer (does it emerge late?).

The lens is :func:`tokensmith.analysis.lens.logit_lens`: each depth's residual stream read through the
model's own final norm and head (nostalgebraist 2020). On a masked LM with its head, a ``[MASK]`` is put
in place of the answer and the lens is read at the mask; a model without an LM head (or an
encoder-decoder) gets a short note instead.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from tokensmith.report import ReportContext, Section, register_section
from tokensmith.report import html as H

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["lens_section", "LENS_PROMPT", "LENS_ANSWER", "MAX_ROWS"]

LENS_PROMPT = "The Eiffel Tower is in the city of"
LENS_ANSWER = " Paris"
MAX_ROWS = 13
TITLE = "Logit lens: what each layer predicts"


def _answer_id(adapter: ModelAdapter) -> int:
    """The answer's first token (" Paris" is one token in most vocabularies; WordPiece drops the space)."""
    tok = adapter.tokenizer
    for s in (LENS_ANSWER, LENS_ANSWER.strip()):
        ids = tok(s, add_special_tokens=False)["input_ids"]
        if ids:
            return int(ids[0])
    raise ValueError("the tokenizer encodes the answer to no token")  # pragma: no cover


def _rows_to_show(layers: list[int], n: int) -> list[int]:
    if len(layers) <= n:
        return list(layers)
    idx = sorted({round(i * (len(layers) - 1) / (n - 1)) for i in range(n)})
    return [layers[i] for i in idx]


@register_section("analysis", order=55, title=TITLE, requires=())
def lens_section(adapter: ModelAdapter, ctx: ReportContext) -> Section:
    """Logit lens of :data:`LENS_PROMPT`: top token per (layer, position) coloured by its probability, and
    the rank of :data:`LENS_ANSWER` per layer at the predicting position.

    Returns a :class:`~tokensmith.report.Section` whose ``data`` holds the per-layer rank, probability and
    top token at the predicting position, the KL to the final layer and the shown grid.

    Examples:
        >>> import tokensmith as ts
        >>> from tokensmith.report import ReportContext
        >>> sec = lens_section(ts.tiny("llama"), ReportContext(model_name="tiny:llama", quick=True))
        >>> sec.data["layers"], len(sec.data["answer_rank"]), sec.data["answer"]
        ([0, 1, 2], 3, ' Paris')

    Raises:
        ValueError: only from the model itself (e.g. a prompt longer than its positions); a model without an
            LM head, or an encoder-decoder, gets a "skipped" section instead.
    """
    from tokensmith.analysis.lens import logit_lens

    s = adapter.structure
    if s.lm_head is None or s.is_encoder_decoder:
        why = "has no LM head" if s.lm_head is None else "is an encoder-decoder model"
        return Section(TITLE, f"<p class='note'>Skipped: {H.esc(adapter.name)} {why}; the logit lens reads one "
                       "layer stack through the LM head.</p>", [f"skipped (model {why})"], {"skipped": ["unembed"]})
    answer = _answer_id(adapter)
    tok = adapter.tokenizer
    causal = bool(adapter.is_causal)
    at = 0
    if causal:
        text: Any = LENS_PROMPT
    else:  # masked LM: put the mask where the answer goes (before a trailing [SEP]) and read it there
        ids = adapter.encode(LENS_PROMPT).input_ids.tolist()
        at = len(ids) - 1 if ids and ids[-1] == getattr(tok, "sep_token_id", None) else len(ids)
        text = ids[:at] + [int(tok.mask_token_id)] + ids[at:]
    f = logit_lens(adapter, text, token=answer, top_k=3)
    L = int(f.meta["num_layers"])
    T = len(f.meta["ids"])
    q = T - 1 if causal else at  # the position whose prediction is the answer
    layers = sorted(set(f.layer.tolist()))
    shown = _rows_to_show(layers, MAX_ROWS)
    cell = {(int(r.layer), int(r.position)): r for r in f.itertuples(index=False)}
    inputs = [cell[(0, t)].input_token for t in range(T)]

    head = ["layer"] + [H.token_text(x) for x in inputs]
    rows = []
    for d in reversed(shown):  # deepest first, as the model reads upward
        tds = [f"<b>{d}</b>"]
        for t in range(T):
            r = cell[(d, t)]
            tip = (f"layer {d}, position {t} ({r.input_token!r}): top {r.top_token!r} p={r.top_prob:.3f}; "
                   f"next 3: {', '.join(repr(x) for x in r.top_k_tokens)}; KL to final {r.kl_to_final:.2f} nats")
            bg = H.heat_color(float(r.top_prob), 1.0)
            outline = ";outline:2px solid #2563eb" if t == q else ""
            tds.append(f'<span title="{H.esc(tip)}" style="display:block;background:{bg}{outline};'
                       f'padding:1px 3px;border-radius:3px;white-space:pre">{H.token_text(r.top_token[:10])}</span>')
        rows.append(tds)
    qrows = f[f.position == q].sort_values("layer")
    ranks = [int(x) for x in qrows.token_rank]
    probs = [float(x) for x in qrows.token_prob]
    tops = qrows.top_token.tolist()
    ans_str = tok.decode([answer])
    first_top = next((d for d, rk in zip(layers, ranks, strict=True) if rk == 0), None)
    first_top10 = next((d for d, rk in zip(layers, ranks, strict=True) if rk < 10), None)
    chart = H.line_chart_svg(
        {f"log10(1 + rank of {ans_str!r})": [math.log10(1 + r) for r in ranks]}, x=layers,
        title=f"rank of {ans_str!r} at position {q} by layer (0 = top-1)", xlabel="layer", ylabel="log10(1+rank)",
    )
    rank_line = ", ".join(f"{d}: {rk}" for d, rk in zip(layers, ranks, strict=True))
    where = "the last position (the next token)" if causal else f"the [MASK] at position {q}"
    body = (
        f"<p>Prompt: <i>{H.esc(LENS_PROMPT)}</i>{'' if causal else ' [MASK]'} — each layer's residual stream "
        "(depth 0 = embeddings, depth ℓ = output of block ℓ−1) is decoded with the model's own final norm and "
        "LM head, <code>softmax(unembed(h<sub>ℓ</sub>))</code> "
        "(<code>tokensmith.analysis.logit_lens</code>; nostalgebraist 2020). A cell shows the top token of "
        "that layer at that position, its background the top token's probability (white 0 → red 1); hover "
        f"for the top 3 and the KL to the final layer. The outlined column is {where}."
        + (f" {len(shown)} of the {len(layers)} depths are shown." if len(shown) < len(layers) else "")
        + "</p>"
        + '<div style="overflow-x:auto">' + H.table(head, rows, raw=True) + "</div>"
        + f"<h3>Rank of {H.esc(repr(ans_str))} by layer</h3>"
        + chart
        + f"<p class='note'>rank per depth (0 = top-1): {H.esc(rank_line)}</p>"
    )
    summary = [
        f"logit lens of {LENS_PROMPT!r}: final top-1 {tops[-1]!r} (p={float(qrows.top_prob.iloc[-1]):.3f}); "
        f"{ans_str!r} rank {ranks[-1]} at the last layer, p={probs[-1]:.3f}",
        (f"{ans_str!r} enters the top 10 at depth {first_top10} and becomes top-1 at depth {first_top} of {L}"
         if first_top is not None
         else f"{ans_str!r} is never top-1; best rank {min(ranks)} (depth {layers[ranks.index(min(ranks))]})"),
        f"KL(final ‖ layer) at {where.split(' (')[0]}: " + ", ".join(
            f"{d}: {float(k):.2f}" for d, k in zip(layers, qrows.kl_to_final, strict=True) if d in shown),
    ]
    data = {
        "prompt": LENS_PROMPT,
        "answer": ans_str,
        "answer_id": answer,
        "objective": f.meta["objective"],
        "position": q,
        "layers": layers,
        "shown_layers": shown,
        "input_tokens": inputs,
        "answer_rank": ranks,
        "answer_prob": probs,
        "top_token": tops,
        "top_prob": [float(x) for x in qrows.top_prob],
        "kl_to_final": [float(x) for x in qrows.kl_to_final],
        "first_layer_top1": first_top,
        "first_layer_top10": first_top10,
        "grid_top_token": [[cell[(d, t)].top_token for t in range(T)] for d in shown],
        "grid_top_prob": [[float(cell[(d, t)].top_prob) for t in range(T)] for d in shown],
    }
    return Section(TITLE, body, summary, data=data)
