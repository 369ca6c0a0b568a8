"""The token-space search section of the ``tokensmith demo`` report (registered on import)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from tokensmith.report import ReportContext, Section, register_section
from tokensmith.report import html as H

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["SEARCH_PROMPT", "SEARCH_TARGET", "search_section"]

SEARCH_PROMPT = "What is the capital of France?"
SEARCH_TARGET = "Sure, here is a poem about cats"


@register_section("search", order=45, title="Token-space search: forcing an answer with GCG",
                  requires=("token_logprobs", "inputs_embeds", "generate"))
def search_section(adapter: ModelAdapter, ctx: ReportContext) -> Section:
    from tokensmith.optimization import search
    from tokensmith.optimization.shortcuts import suffix_problem

    steps, width, topk, n_suffix = (2, 8, 16, 8) if ctx.quick else (12, 64, 128, 12)
    problem = suffix_problem(adapter, SEARCH_PROMPT, SEARCH_TARGET, suffix=" !" * n_suffix)
    t0 = time.perf_counter()
    res = search(adapter, problem, "gcg", steps=steps, seed=ctx.seed, search_width=width, topk=topk,
                 time_limit=22.0, progress=False)
    secs = time.perf_counter() - t0
    obj = problem.objective
    tpl = obj.templates[0]

    def answer(text: str) -> str:
        enc = tpl.render(text, target=None)
        return adapter.generate(enc, max_new_tokens=10).texts[0]

    before, after = answer(tpl.decode(obj.init_ids)), answer(res.best_string)
    curve = H.line_chart_svg(
        {"selected candidate": [res.init_loss] + [h["loss"] for h in res.history],
         "best so far": [res.init_loss] + res.losses},
        title="target loss (mean NLL per target token)", xlabel="step",
    )
    h0 = res.history[-1] if res.history else {}
    rows = [
        ["initial", repr(tpl.decode(obj.init_ids)), f"{res.init_loss:.3f}", before],
        ["found", repr(res.best_string), f"{res.best_loss:.3f} (string {res.string_loss:.3f})", after],
    ]
    body = (
        f"<p>User: <i>{H.esc(SEARCH_PROMPT)}</i> — target answer <i>{H.esc(SEARCH_TARGET)}</i>. "
        f"<code>tokensmith.optimization.search</code> runs GCG (Zou et al. 2023): the one-hot gradient ranks "
        f"{topk} swaps per suffix position, {width} candidates per step are scored exactly with the prompt's KV "
        f"cache shared and logits only at the target positions, and candidates whose string would re-tokenize "
        f"differently in the chat template are dropped. {res.steps} steps in {secs:.1f} s "
        f"({h0.get('forwards', 0)} sequence forwards). Red-teaming tool: for evaluating models you are "
        f"responsible for.</p>"
        + H.table(["suffix", "text", "loss", "greedy answer (10 tokens)"], rows)
        + curve
    )
    return Section(
        "Token-space search: forcing an answer with GCG",
        body,
        [f"GCG {res.steps} steps: target loss {res.init_loss:.3f} -> {res.best_loss:.3f} in {secs:.1f} s"],
        data={"init_loss": res.init_loss, "best_loss": res.best_loss, "string_loss": res.string_loss,
              "best_string": res.best_string, "losses": res.losses, "seconds": secs, "answer_before": before,
              "answer_after": after, "steps": res.steps},
    )
