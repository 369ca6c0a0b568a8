"""The attribution section of the ``tokensmith demo`` report (registered on import)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from tokensmith.report import ReportContext, Section, register_section
from tokensmith.report import html as H

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["ATTRIBUTION_QUESTION", "ATTRIBUTION_ANSWER", "attribution_section"]

ATTRIBUTION_QUESTION = "My friend Alice has a red ball and Bob has a blue ball. What colour is Alice's ball?"
ATTRIBUTION_ANSWER = "Red."


@register_section("attribution", order=35, title="Which prompt words the answer rests on",
                  requires=("token_logprobs", "inputs_embeds"))
def attribution_section(adapter: ModelAdapter, ctx: ReportContext) -> Section:
    from tokensmith.attribution import evaluate, prepare, run_method
    from tokensmith.attribution.base import get_method

    chat = bool(adapter.capabilities()["features"]["chat_template"])
    # the first answer word carries the answer: one row keeps IG at one backward per step batch
    problem = prepare(adapter, ATTRIBUTION_QUESTION, ATTRIBUTION_ANSWER, chat=chat, target_span=(0, 3))
    n_steps = 4 if ctx.quick else 32
    runs = [("integrated_gradients", {"n_steps": n_steps, "rule": "riemann_middle"}), ("occlusion", {})]
    if adapter.capabilities()["features"]["attention_probe"]:
        runs += [("attention_rollout", {}), ("alti", {}), ("direct_logit", {})]
    results, times, comp = {}, {}, {}
    for name, kw in runs:
        t = time.perf_counter()
        try:
            results[name] = run_method(problem, get_method(name, **kw))
        except ValueError:  # a method this model cannot support (e.g. DLA on a post-LN model): left out
            continue
        times[name] = time.perf_counter() - t
        comp[name] = evaluate(adapter, results[name], ["comprehensiveness"], problem=problem)["comprehensiveness"]
    ig = results["integrated_gradients"]
    row = 0
    rows = []
    tops = {}
    for name, res in results.items():
        words = res.aggregate("words")
        top = [t.strip() for _, t, _ in words.top(5, row=row)]
        tops[name] = top
        rows.append([name, f"{times[name]:.1f}", f"{comp[name]:.4f}", ", ".join(top)])
    rel = ig.relative_delta()
    body = (
        f"<p>User: <i>{H.esc(ATTRIBUTION_QUESTION)}</i> — forced answer <i>{H.esc(ATTRIBUTION_ANSWER)}</i>. "
        f"<code>tokensmith.attribution.attribute</code> scores every prompt token for each answer token in one "
        f"pass of the method (one forward per IG step and one backward per answer token). Chat-template tokens "
        f"are flagged and held at their real embeddings along the IG path. Top words for the answer token "
        f"{H.esc(repr(ig.target_labels[row]))}:</p>"
        + H.table(["method", "seconds", "comprehensiveness ↑", "top-5 words"], rows)
        + "<p>Comprehensiveness: the drop in p(answer token) when the method's top 1/5/10/20/50% of prompt "
        "tokens are replaced by the pad token, averaged (ERASER's AOPC; higher is more faithful).</p>"
        + f"<p>Integrated gradients ({n_steps} midpoint steps, pad baseline): completeness error "
        f"|Σ attributions − (f(x) − f(x′))| / |f(x) − f(x′)| = {float(rel[row]):.1%} for this row "
        f"(max over rows {float(rel.max()):.1%}). Heatmap (red raises the log-prob, blue lowers it; hover for "
        f"values):</p>" + ig.to_html(max_rows=len(ig.target_labels))
    )
    return Section(
        "Which prompt words the answer rests on",
        body,
        [f"IG top words for {ig.target_labels[row]!r}: {', '.join(tops['integrated_gradients'])} "
         f"(completeness error {float(rel[row]):.1%})"],
        data={"tops": tops, "seconds": times, "comprehensiveness": comp, "ig_relative_delta": rel.tolist(),
              "rows": ig.target_labels},
    )
