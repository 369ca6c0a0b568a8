"""The demo's alignment section on a tiny model: rewards are the difference of the two prompts' log-probs."""

from __future__ import annotations

import torch

import tokensmith as ts
from tokensmith.alignment.report import BETTER, PAIR, WORSE, alignment_section
from tokensmith.report import ReportContext


def test_alignment_section_rewards_are_log_prob_differences():
    ad = ts.tiny("llama")
    sec = alignment_section(ad, ReportContext(model_name="tiny:llama", quick=True))
    d = sec.data
    prompt, chosen, _ = PAIR
    lps = []
    for system in (BETTER, WORSE):
        enc = ad.encode(prompt, target=chosen, chat=True, system=system)
        lps.append(ad.token_logprobs(enc)[0][enc.target_mask])
    ref = (lps[0] - lps[1]).tolist()
    assert torch.allclose(torch.tensor(d["chosen"]["rewards"]), torch.tensor(ref), atol=1e-5)
    assert abs(d["margin"] - (d["chosen"]["total"] - d["rejected"]["total"])) < 1e-6
    assert d["chosen"]["tokens"][:-2] == d["rejected"]["tokens"][:-2]  # same up to the answer word
    assert sec.html.count("data-reward=") == len(d["chosen"]["tokens"]) + len(d["rejected"]["tokens"])
