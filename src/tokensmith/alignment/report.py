"""The alignment section of the ``tokensmith demo`` report: per-token rewards of one preference pair
(registered on import)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokensmith.report import ReportContext, Section, register_section
from tokensmith.report import html as H

if TYPE_CHECKING:  # pragma: no cover
    from tokensmith.models.adapter import ModelAdapter

__all__ = ["PAIR", "BETTER", "WORSE", "alignment_section"]

PAIR = ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Berlin.")
BETTER = "You are a helpful assistant. Always answer correctly."
WORSE = "You are an assistant that always gives wrong answers."


def _completion_logprobs(adapter: ModelAdapter, system: str, prompt: str, completion: str, chat: bool):
    kw = {"chat": True, "system": system} if chat else {}
    text_prompt = prompt if chat else f"{system}\n{prompt}\n"
    enc = adapter.encode(text_prompt, target=(completion if chat else " " + completion), **kw)
    lp = adapter.token_logprobs(enc)[0]
    tm = enc.target_mask
    return enc.input_ids[tm], lp[tm], [enc.tokens[i] for i in torch.nonzero(tm).flatten().tolist()]


def _row(adapter: ModelAdapter, ids: torch.Tensor, r: torch.Tensor) -> str:
    vmax = float(r.abs().max()) or 1.0
    chips = []
    for i, v in zip(ids.tolist(), r.tolist(), strict=True):
        x = v / vmax
        col = f"rgba(22,163,74,{min(1.0, x):.3f})" if x >= 0 else f"rgba(220,38,38,{min(1.0, -x):.3f})"
        text = adapter.tokenizer.decode([i])
        chips.append(H.chip(H.token_text(text), title=f"{text!r}: r = {v:+.3f} nats", color=col,
                            attrs=f'data-reward="{v:.6f}"'))
    return "".join(chips)


@register_section("alignment", order=48, title="Per-token rewards of a preference pair",
                  requires=("token_logprobs",))
def alignment_section(adapter: ModelAdapter, ctx: ReportContext) -> Section:
    from tokensmith.alignment.losses import self_contrastive_token_rewards

    chat = bool(adapter.capabilities()["features"]["chat_template"])
    prompt, chosen, rejected = PAIR
    rows, data = [], {}
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        ids_b, lp_b, toks = _completion_logprobs(adapter, BETTER, prompt, completion, chat)
        ids_w, lp_w, _ = _completion_logprobs(adapter, WORSE, prompt, completion, chat)
        if not torch.equal(ids_b, ids_w):  # the two prompts tokenized the completion differently
            raise ValueError("the completion tokenizes differently after the two system prompts")
        m = torch.ones(1, len(ids_b), dtype=torch.bool)
        r = self_contrastive_token_rewards(lp_b[None], lp_w[None], m, normalize="none")[0]
        data[name] = {"tokens": toks, "rewards": r.tolist(), "total": float(r.sum())}
        rows.append((name, completion, ids_b, r))
    margin = data["chosen"]["total"] - data["rejected"]["total"]
    body = (
        f"<p>User: <i>{H.esc(prompt)}</i>. Each completion token's reward is the self-contrastive token reward "
        "of T-REG (Zhou et al. 2024): r<sub>t</sub> = log π(y<sub>t</sub> | x<sub>better</sub>, y<sub>&lt;t</sub>) − "
        "log π(y<sub>t</sub> | x<sub>worse</sub>, y<sub>&lt;t</sub>), the same model scored after a system prompt "
        f"asking for correct answers (<i>{H.esc(BETTER)}</i>) and one asking for wrong answers "
        f"(<i>{H.esc(WORSE)}</i>), with <code>tokensmith.alignment.self_contrastive_token_rewards</code>. Green "
        "tokens are more likely under the 'correct' prompt, red under the 'wrong' one; hover for values. Such "
        "per-token rewards are what token-level preference losses (TDPO, SparsePO, cDPO, T-REG) weigh tokens "
        "with, where sequence-level DPO sees only the sums.</p>"
        + "".join(
            f'<p><b>{name}</b> (Σ r = {float(r.sum()):+.3f}): {_row(adapter, ids, r)}</p>' for name, _, ids, r in rows
        )
        + f"<p>Σ r(chosen) − Σ r(rejected) = {margin:+.3f} nats.</p>"
    )
    top = {n: max(zip(d["rewards"], d["tokens"], strict=True))[1] for n, d in data.items()}
    return Section(
        "Per-token rewards of a preference pair",
        body,
        [f"self-contrastive token rewards: Σ chosen {data['chosen']['total']:+.3f}, Σ rejected "
         f"{data['rejected']['total']:+.3f} (margin {margin:+.3f}); top chosen token {top['chosen']!r}"],
        data={**data, "margin": margin},
    )
